/*
 * A TEST DOUBLE for libnrt, the AWS Neuron runtime. No Neuron runtime and no Neuron device
 * exist on the machines that run Kiln's tests: this file stands in for libnrt so that
 * runtime_loader/executors/neff.py can be exercised through ctypes exactly as it calls the
 * real library. It computes nothing on any accelerator.
 *
 * It implements only the functions the executor calls, with the signatures, enum values and
 * struct layouts of nrt.h, nrt_status.h and nrt_experimental.h (aws-neuron/aws-neuron-sdk,
 * src/libnrt/include/nrt/). The declarations are repeated here so that no Neuron header is
 * needed to build it:  cc -shared -fPIC -o libnrt_standin.so nrt_standin.c
 *
 * Its "model": nrt_load checks the NEFF's 1024-byte little-endian header (u64 header_size at
 * offset 8 must be 1024, u64 data_size at 16 must be the size of what follows) and reads the
 * header's name field (char[256] at offset 220), which must be "standin:D0[,D1...]". The
 * model then has one float32 input "input0" and one float32 output "output0" of that shape,
 * and executing it computes output0 = input0 * 2 + 1.
 *
 * Errors return the NRT_STATUS codes of nrt_status.h: NRT_INVALID for a bad NEFF, bad
 * arguments or tensors that do not match the model, NRT_UNINITIALIZED / NRT_CLOSED for calls
 * outside nrt_init() .. nrt_close(), NRT_RESOURCE when malloc fails.
 *
 * One extra symbol, nrt_standin_live_objects(), is not part of libnrt: it counts live models,
 * tensors, tensor sets and tensor-info arrays so tests can check that nothing leaks, and its
 * presence tells a stand-in from the real library.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- nrt_status.h ---- */
typedef enum {
    NRT_SUCCESS = 0,
    NRT_FAILURE = 1,
    NRT_INVALID = 2,
    NRT_INVALID_HANDLE = 3,
    NRT_RESOURCE = 4,
    NRT_TIMEOUT = 5,
    NRT_HW_ERROR = 6,
    NRT_QUEUE_FULL = 7,
    NRT_LOAD_NOT_ENOUGH_NC = 9,
    NRT_UNSUPPORTED_NEFF_VERSION = 10,
    NRT_UNINITIALIZED = 13,
    NRT_CLOSED = 14,
    NRT_EXEC_BAD_INPUT = 1002,
    NRT_EXEC_COMPLETED_WITH_NUM_ERR = 1003,
    NRT_EXEC_COMPLETED_WITH_ERR = 1004,
    NRT_EXEC_NC_BUSY = 1005,
    NRT_COLL_PENDING = 1100,
} NRT_STATUS;

/* ---- nrt.h ---- */
typedef struct nrt_model nrt_model_t;
typedef struct nrt_tensor nrt_tensor_t;
typedef void nrt_tensor_set_t;

typedef enum {
    NRT_TENSOR_PLACEMENT_DEVICE,
    NRT_TENSOR_PLACEMENT_HOST,
    NRT_TENSOR_PLACEMENT_VIRTUAL,
} nrt_tensor_placement_t;

typedef enum {
    NRT_FRAMEWORK_TYPE_INVALID = 0,
    NRT_FRAMEWORK_TYPE_NO_FW = 1,
    NRT_FRAMEWORK_TYPE_TENSORFLOW,
    NRT_FRAMEWORK_TYPE_PYTORCH,
    NRT_FRAMEWORK_TYPE_MXNET,
    NRT_FRAMEWORK_TYPE_PRECHECK,
} nrt_framework_type_t;

typedef enum nrt_dtype {
    NRT_DTYPE_UNKNOWN = 0x0,
    NRT_DTYPE_FLOAT32 = 0xA,
} nrt_dtype_t; /* only the member this stand-in reports; values as in nrt.h */

/* ---- nrt_experimental.h ---- */
typedef enum nrt_tensor_usage {
    NRT_TENSOR_USAGE_INPUT = 0,
    NRT_TENSOR_USAGE_OUTPUT,
} nrt_tensor_usage_t;

#define NRT_TENSOR_NAME_MAX 256

typedef struct nrt_tensor_info {
    char name[NRT_TENSOR_NAME_MAX];
    nrt_tensor_usage_t usage;
    size_t size;
    nrt_dtype_t dtype;
    uint32_t *shape;
    uint32_t ndim;
} nrt_tensor_info_t;

typedef struct nrt_tensor_info_array {
    uint64_t tensor_count;
    nrt_tensor_info_t tensor_array[];
} nrt_tensor_info_array_t;

/* ---- the stand-in's own state ---- */
#define NEFF_HEADER_SIZE 1024
#define NEFF_NAME_OFFSET 220
#define NEFF_NAME_LEN 256
#define MAX_NDIM 8

enum { STATE_NEW, STATE_OPEN, STATE_CLOSED };
static int g_state = STATE_NEW;
static long g_live = 0;

struct nrt_model {
    int32_t vnc;
    uint32_t ndim;
    uint32_t shape[MAX_NDIM];
    size_t elements;
};

struct nrt_tensor {
    nrt_tensor_placement_t placement;
    int vnc;
    size_t size;
    unsigned char *data;
    char name[NRT_TENSOR_NAME_MAX];
};

typedef struct {
    char name[NRT_TENSOR_NAME_MAX];
    nrt_tensor_t *tensor;
} set_entry_t;

typedef struct {
    size_t count;
    size_t capacity;
    set_entry_t *entries;
} tensor_set_t;

long nrt_standin_live_objects(void) { return g_live; }

static NRT_STATUS check_open(void) {
    if (g_state == STATE_OPEN) return NRT_SUCCESS;
    return g_state == STATE_CLOSED ? NRT_CLOSED : NRT_UNINITIALIZED;
}

static uint64_t read_u64_le(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

NRT_STATUS nrt_init(nrt_framework_type_t framework, const char *fw_version, const char *fal_version) {
    if (g_state == STATE_OPEN) return NRT_FAILURE; /* already initialized */
    if (framework < NRT_FRAMEWORK_TYPE_NO_FW || framework > NRT_FRAMEWORK_TYPE_PRECHECK) return NRT_INVALID;
    (void)fw_version; /* version strings are informational */
    (void)fal_version;
    g_state = STATE_OPEN;
    return NRT_SUCCESS;
}

void nrt_close(void) {
    if (g_state == STATE_OPEN) g_state = STATE_CLOSED;
}

/* "standin:4" -> ndim 1, shape {4}; "standin:2,3" -> ndim 2, shape {2, 3}. */
static int parse_name(const unsigned char *field, struct nrt_model *m) {
    char name[NEFF_NAME_LEN + 1];
    memcpy(name, field, NEFF_NAME_LEN);
    name[NEFF_NAME_LEN] = '\0';
    const char *prefix = "standin:";
    if (strncmp(name, prefix, strlen(prefix)) != 0) return 0;
    const char *p = name + strlen(prefix);
    m->ndim = 0;
    m->elements = 1;
    while (*p) {
        if (m->ndim == MAX_NDIM || *p < '0' || *p > '9') return 0;
        char *end;
        unsigned long d = strtoul(p, &end, 10);
        if (d == 0 || d > 1u << 24) return 0;
        m->shape[m->ndim++] = (uint32_t)d;
        m->elements *= d;
        if (m->elements > (size_t)1 << 28) return 0;
        p = end;
        if (*p == ',') p++;
        else if (*p) return 0;
    }
    return m->ndim > 0;
}

NRT_STATUS nrt_load(const void *neff_bytes, size_t size, int32_t vnc, int32_t vnc_count, nrt_model_t **model) {
    NRT_STATUS st = check_open();
    if (st != NRT_SUCCESS) return st;
    if (neff_bytes == NULL || model == NULL || vnc < -1 || vnc_count < -1 || vnc_count == 0) return NRT_INVALID;
    const unsigned char *b = (const unsigned char *)neff_bytes;
    if (size < NEFF_HEADER_SIZE) return NRT_INVALID;
    if (read_u64_le(b + 8) != NEFF_HEADER_SIZE) return NRT_INVALID;
    if (read_u64_le(b + 16) != size - NEFF_HEADER_SIZE) return NRT_INVALID;
    struct nrt_model parsed;
    if (!parse_name(b + NEFF_NAME_OFFSET, &parsed)) return NRT_INVALID;
    struct nrt_model *m = malloc(sizeof *m);
    if (m == NULL) return NRT_RESOURCE;
    *m = parsed;
    m->vnc = vnc < 0 ? 0 : vnc;
    *model = m;
    g_live++;
    return NRT_SUCCESS;
}

NRT_STATUS nrt_unload(nrt_model_t *model) {
    NRT_STATUS st = check_open();
    if (st != NRT_SUCCESS) return st;
    if (model == NULL) return NRT_INVALID;
    free(model);
    g_live--;
    return NRT_SUCCESS;
}

static void fill_info(nrt_tensor_info_t *info, const char *name, nrt_tensor_usage_t usage,
                      const struct nrt_model *m, uint32_t *shape) {
    memset(info->name, 0, sizeof info->name);
    strncpy(info->name, name, NRT_TENSOR_NAME_MAX - 1);
    info->usage = usage;
    info->size = m->elements * sizeof(float);
    info->dtype = NRT_DTYPE_FLOAT32;
    memcpy(shape, m->shape, m->ndim * sizeof(uint32_t));
    info->shape = shape;
    info->ndim = m->ndim;
}

NRT_STATUS nrt_get_model_tensor_info(nrt_model_t *model, nrt_tensor_info_array_t **tensor_info) {
    NRT_STATUS st = check_open();
    if (st != NRT_SUCCESS) return st;
    if (model == NULL || tensor_info == NULL) return NRT_INVALID;
    nrt_tensor_info_array_t *arr = calloc(1, sizeof *arr + 2 * sizeof(nrt_tensor_info_t));
    uint32_t *shapes = malloc(2 * MAX_NDIM * sizeof(uint32_t));
    if (arr == NULL || shapes == NULL) {
        free(arr);
        free(shapes);
        return NRT_RESOURCE;
    }
    arr->tensor_count = 2;
    fill_info(&arr->tensor_array[0], "input0", NRT_TENSOR_USAGE_INPUT, model, shapes);
    fill_info(&arr->tensor_array[1], "output0", NRT_TENSOR_USAGE_OUTPUT, model, shapes + MAX_NDIM);
    *tensor_info = arr;
    g_live++;
    return NRT_SUCCESS;
}

NRT_STATUS nrt_free_model_tensor_info(nrt_tensor_info_array_t *tensor_info) {
    if (tensor_info == NULL) return NRT_INVALID;
    free(tensor_info->tensor_array[0].shape); /* both shapes share one block */
    free(tensor_info);
    g_live--;
    return NRT_SUCCESS;
}

NRT_STATUS nrt_allocate_tensor_set(nrt_tensor_set_t **result) {
    NRT_STATUS st = check_open();
    if (st != NRT_SUCCESS) return st;
    if (result == NULL) return NRT_INVALID;
    tensor_set_t *set = calloc(1, sizeof *set);
    if (set == NULL) return NRT_RESOURCE;
    *result = set;
    g_live++;
    return NRT_SUCCESS;
}

void nrt_destroy_tensor_set(nrt_tensor_set_t **tensor_set) {
    if (tensor_set == NULL || *tensor_set == NULL) return;
    tensor_set_t *set = (tensor_set_t *)*tensor_set;
    free(set->entries); /* the tensors themselves belong to the caller */
    free(set);
    *tensor_set = NULL;
    g_live--;
}

static set_entry_t *find_entry(tensor_set_t *set, const char *name) {
    for (size_t i = 0; i < set->count; i++)
        if (strncmp(set->entries[i].name, name, NRT_TENSOR_NAME_MAX) == 0) return &set->entries[i];
    return NULL;
}

NRT_STATUS nrt_add_tensor_to_tensor_set(nrt_tensor_set_t *tensor_set, const char *tensor_name, nrt_tensor_t *tensor) {
    if (tensor_set == NULL || tensor_name == NULL || tensor == NULL) return NRT_INVALID;
    if (strlen(tensor_name) >= NRT_TENSOR_NAME_MAX) return NRT_INVALID;
    tensor_set_t *set = (tensor_set_t *)tensor_set;
    set_entry_t *e = find_entry(set, tensor_name);
    if (e == NULL) {
        if (set->count == set->capacity) {
            size_t cap = set->capacity ? 2 * set->capacity : 4;
            set_entry_t *grown = realloc(set->entries, cap * sizeof *grown);
            if (grown == NULL) return NRT_RESOURCE;
            set->entries = grown;
            set->capacity = cap;
        }
        e = &set->entries[set->count++];
        memset(e->name, 0, sizeof e->name);
        strcpy(e->name, tensor_name);
    }
    e->tensor = tensor; /* add or replace */
    return NRT_SUCCESS;
}

NRT_STATUS nrt_get_tensor_from_tensor_set(nrt_tensor_set_t *tensor_set, const char *tensor_name, nrt_tensor_t **tensor) {
    if (tensor_set == NULL || tensor_name == NULL || tensor == NULL) return NRT_INVALID;
    set_entry_t *e = find_entry((tensor_set_t *)tensor_set, tensor_name);
    if (e == NULL) return NRT_INVALID;
    *tensor = e->tensor;
    return NRT_SUCCESS;
}

NRT_STATUS nrt_tensor_allocate(nrt_tensor_placement_t tensor_placement, int vnc, size_t size, const char *name, nrt_tensor_t **tensor) {
    NRT_STATUS st = check_open();
    if (st != NRT_SUCCESS) return st;
    if (tensor == NULL || size == 0) return NRT_INVALID;
    if (tensor_placement < NRT_TENSOR_PLACEMENT_DEVICE || tensor_placement > NRT_TENSOR_PLACEMENT_VIRTUAL) return NRT_INVALID;
    if (tensor_placement == NRT_TENSOR_PLACEMENT_DEVICE && vnc < 0) return NRT_INVALID;
    struct nrt_tensor *t = calloc(1, sizeof *t);
    if (t == NULL) return NRT_RESOURCE;
    t->data = calloc(1, size);
    if (t->data == NULL) {
        free(t);
        return NRT_RESOURCE;
    }
    t->placement = tensor_placement;
    t->vnc = vnc;
    t->size = size;
    if (name != NULL) strncpy(t->name, name, NRT_TENSOR_NAME_MAX - 1);
    *tensor = t;
    g_live++;
    return NRT_SUCCESS;
}

void nrt_tensor_free(nrt_tensor_t **tensor) {
    if (tensor == NULL || *tensor == NULL) return;
    free((*tensor)->data);
    free(*tensor);
    *tensor = NULL;
    g_live--;
}

NRT_STATUS nrt_tensor_write(nrt_tensor_t *tensor, const void *buf, size_t offset, size_t size) {
    if (tensor == NULL || buf == NULL) return NRT_INVALID;
    if (offset > tensor->size || size > tensor->size - offset) return NRT_INVALID;
    memcpy(tensor->data + offset, buf, size);
    return NRT_SUCCESS;
}

NRT_STATUS nrt_tensor_read(const nrt_tensor_t *tensor, void *buf, size_t offset, size_t size) {
    if (tensor == NULL || buf == NULL) return NRT_INVALID;
    if (offset > tensor->size || size > tensor->size - offset) return NRT_INVALID;
    memcpy(buf, tensor->data + offset, size);
    return NRT_SUCCESS;
}

/* A tensor the model can use: present, of the model's byte size, and on the model's core. */
static nrt_tensor_t *model_tensor(const nrt_model_t *model, const nrt_tensor_set_t *set, const char *name) {
    set_entry_t *e = find_entry((tensor_set_t *)set, name);
    if (e == NULL) return NULL;
    nrt_tensor_t *t = e->tensor;
    if (t->size != model->elements * sizeof(float)) return NULL;
    if (t->placement == NRT_TENSOR_PLACEMENT_DEVICE && t->vnc != model->vnc) return NULL;
    return t;
}

NRT_STATUS nrt_execute(nrt_model_t *model, const nrt_tensor_set_t *input_set, nrt_tensor_set_t *output_set) {
    NRT_STATUS st = check_open();
    if (st != NRT_SUCCESS) return st;
    if (model == NULL || input_set == NULL || output_set == NULL) return NRT_INVALID;
    nrt_tensor_t *in = model_tensor(model, input_set, "input0");
    nrt_tensor_t *out = model_tensor(model, output_set, "output0");
    if (in == NULL || out == NULL) return NRT_INVALID;
    const float *x = (const float *)in->data;
    float *y = (float *)out->data;
    for (size_t i = 0; i < model->elements; i++) y[i] = x[i] * 2.0f + 1.0f;
    return NRT_SUCCESS;
}
