"""How far general-purpose compressors get on the merged values a coded collection keeps, beside the coded
format's own value planes (bits per kept value). The values are float32 sums of task vectors; the point is
whether any off-the-shelf model finds structure that the byte-plane coding misses.

    python benchmarks/values_bound.py COLLECTION_DIR_OR_CODED_FILE
"""

from __future__ import annotations

import argparse
import bz2
import lzma
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    import numpy as np
    import torch
    import zstandard

    from tallmasks.storage.coded import CodedFile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("collection", help="a `tallmasks compress --storage coded` folder, or its coded.safetensors")
    path = Path(parser.parse_args().collection)
    coded = CodedFile(path / "coded.safetensors" if path.is_dir() else path)
    values = [t.kept_values.numpy() for t in coded.tensors() if t.kept_values.dtype == torch.float32]
    raw = np.concatenate(values).tobytes() if values else b""
    n = len(raw) // 4
    if not n:
        raise SystemExit(f"{path}: no kept float32 values")
    planes = np.frombuffer(raw, np.uint8).reshape(-1, 4)
    by_plane = b"".join(np.ascontiguousarray(planes[:, j]).tobytes() for j in range(4))
    stored = sum(s["bytes"] for e in coded.index.values() if e["dtype"] == "float32" for c in e["chunks"] for s in c["planes"])
    rows = [
        ("coded format (byte planes, each stream's best coder)", stored),
        ("xz -9e", len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))),
        ("xz -9e on the byte planes", len(lzma.compress(by_plane, preset=9 | lzma.PRESET_EXTREME))),
        ("bzip2 -9", len(bz2.compress(raw, 9))),
        ("zstd -22", len(zstandard.ZstdCompressor(level=22).compress(raw))),
    ]
    print(f"{n} kept float32 values (32 bits each stored plainly)")
    for name, size in rows:
        print(f"{name}: {8 * size / n:.2f} bits per value")


if __name__ == "__main__":
    main()
