"""A wheel set as it travels to the GPU machine: one xz-compressed tar of the wheels, stored uncompressed inside.

A wheel is a zip whose files are deflated one by one; xz over the raw files of a whole set finds far more to
share (the shared libraries of PyAV, faiss, decord): the three sets of bench/device_wheels.sh shrink from 49 / 30 /
49 MB of wheels to 36 / 26 / 36 MB, which leaves the working tree room to grow under what a call carries.

  python3 bench/wheelset.py pack FOLDER        FOLDER/*.whl -> FOLDER/wheels.tar.xz (the .whl files removed)
  python3 bench/wheelset.py unpack FOLDER DEST FOLDER/wheels.tar.xz -> DEST/*.whl, installable by pip as they were

The wheels' files, their names and RECORD are unchanged (pip checks RECORD's hashes against the files, not
against how the zip compressed them). Standard library only: it runs on the GPU machine before anything is
installed there.
"""

from __future__ import annotations

import io
import lzma
import sys
import tarfile
import zipfile
from pathlib import Path

ARCHIVE = "wheels.tar.xz"


def stored(wheel: Path) -> bytes:
    """The wheel rewritten with every member stored, not deflated."""
    out = io.BytesIO()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)  # read before the entry's compression is changed: it names how to read it
            info.compress_type = zipfile.ZIP_STORED
            dst.writestr(info, data)
    return out.getvalue()


def pack(folder: Path) -> Path:
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"no wheels in {folder} to pack")
    target = folder / ARCHIVE
    partial = folder / (ARCHIVE + ".partial")
    with tarfile.open(partial, "w:xz", preset=6) as tar:
        for wheel in wheels:
            data = stored(wheel)
            info = tarfile.TarInfo(wheel.name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    partial.replace(target)
    for wheel in wheels:
        wheel.unlink()
    return target


def unpack(folder: Path, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    try:
        with tarfile.open(folder / ARCHIVE, "r:xz") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if not member.isfile() or not name.endswith(".whl") or name != member.name:
                    raise SystemExit(f"{folder / ARCHIVE}: {member.name!r} is not a wheel of the set")
                (dest / name).write_bytes(tar.extractfile(member).read())
                names.append(dest / name)
    except (tarfile.TarError, lzma.LZMAError, EOFError) as err:
        raise SystemExit(f"{folder / ARCHIVE}: cannot be read ({err})") from None
    return names


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "pack":
        print(pack(Path(argv[1])))
    elif len(argv) == 3 and argv[0] == "unpack":
        print(len(unpack(Path(argv[1]), Path(argv[2]))), "wheels")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
