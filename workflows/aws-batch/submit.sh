#!/usr/bin/env bash
# Fan one Kiln spec out over an AWS Batch array job, then tag the releases (explained in
# workflows/README.md):
#   1. register (a new revision of) job-definition.json;
#   2. submit an array job of SHARDS children: child i runs
#      `kiln compile SPEC --shard-count SHARDS --no-publish` with AWS_BATCH_JOB_ARRAY_INDEX=i;
#   3. submit the release job, which depends on the array job (it starts once every child
#      succeeded) and runs the unsharded `kiln compile SPEC`: all direct hits, tags releases.
#
# Usage: submit.sh SPEC SHARDS
#   SPEC    the spec's path inside the image (e.g. /opt/kiln/specs/models.yaml)
#   SHARDS  number of array children, 2 to 10000 (an AWS Batch array job has at least 2)
# Environment: KILN_JOB_QUEUE (the job queue), KILN_STORE (s3://BUCKET/PREFIX), optional
# KILN_WORKERS (compile processes per child, default 8, matching the definition's VCPU).
# The index URL comes from Secrets Manager (see job-definition.json), S3 access from the
# job role. Needs the AWS CLI with credentials and a region.
set -euo pipefail

usage="usage: $0 SPEC SHARDS (with KILN_JOB_QUEUE and KILN_STORE set)"
spec="${1:?$usage}"
shards="${2:?$usage}"
queue="${KILN_JOB_QUEUE:?$usage}"
store="${KILN_STORE:?$usage}"
workers="${KILN_WORKERS:-8}"
here="$(cd "$(dirname "$0")" && pwd)"

case "$shards" in
  ''|*[!0-9]*) echo "SHARDS must be a number, got '$shards'" >&2; exit 2 ;;
esac
if [ "$shards" -lt 2 ] || [ "$shards" -gt 10000 ]; then
  echo "an AWS Batch array job has 2 to 10000 children; got SHARDS=$shards" >&2
  exit 2
fi

definition=$(aws batch register-job-definition \
  --cli-input-json "file://$here/job-definition.json" \
  --query jobDefinitionArn --output text)

environment="[{\"name\": \"KILN_STORE\", \"value\": \"$store\"}]"

array_job=$(aws batch submit-job \
  --job-name kiln-compile-shards \
  --job-queue "$queue" \
  --job-definition "$definition" \
  --array-properties "size=$shards" \
  --parameters "spec=$spec,shards=$shards,workers=$workers" \
  --container-overrides "{\"environment\": $environment}" \
  --query jobId --output text)

release_job=$(aws batch submit-job \
  --job-name kiln-compile-release \
  --job-queue "$queue" \
  --job-definition "$definition" \
  --depends-on "jobId=$array_job" \
  --container-overrides "{\"command\": [\"kiln\", \"compile\", \"$spec\", \"--workers\", \"$workers\", \"--json\"], \"environment\": $environment}" \
  --query jobId --output text)

echo "array job $array_job: $shards shards of $spec"
echo "release job $release_job: runs after every shard succeeded"
