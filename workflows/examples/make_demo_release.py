"""Write a small two-graph release into $KILN_STORE and tag it demo:latest (store demo only)."""

from __future__ import annotations

import datetime as dt
import os

from artifacts.manifest import BlobRef, CompilerInfo, Graph, Provenance, Release, Source
from artifacts.store import Store


def main() -> None:
    with Store.open(os.environ["KILN_STORE"]) as store:

        def put(data: bytes) -> BlobRef:
            result = store.put_bytes(data)
            return BlobRef(result.digest, result.size)

        weights = put(os.urandom(1 << 20))
        graphs = []
        for seq in (32, 64):
            graphs.append(
                Graph(
                    kind="encode",
                    bucket={"batch": 1, "seq": seq},
                    signature={},
                    hlo=put(f"hlo for seq {seq}".encode()),
                    executable=put(os.urandom(4096)),
                    format="xla-cpu",
                    compiler=CompilerInfo("xla-cpu", "demo", ()),
                    hlo_key=f"demo-{seq}",
                )
            )
        release = Release(
            name="demo",
            target="cpu",
            source=Source("encoder", "demo-architecture", {}, (weights,)),
            graphs=tuple(graphs),
            provenance=Provenance("0.1.0", dt.datetime.now(dt.UTC).isoformat()),
        )
        digest = store.put_release(release)
        move = store.tag(str(digest), "demo:latest", reason="demo")
        print(f"stored {move.name}:{move.tag} -> {digest}")


if __name__ == "__main__":
    main()
