"""Random patch reads for training from preprocessed cases: memory-mapped .npy vs alternatives.

Writes a few preprocessed-like cases (float32 (4, 200, 400, 400) data: one CT channel with the
library's CT normalization, three MR-like channels z-scored in the body mask, zero outside;
int16 label with -1 outside the body) in each format, then times random patch reads the way
a training data loader does them: open the case, read one patch of data and label, close.

Formats:
  npy-mmap      uncompressed .npy, ``np.load(mmap_mode="r")`` (the library's choice, storage.py)
  npy-random    the same files memory-mapped with ``madvise(MADV_RANDOM)`` (no readahead)
  npy-pread     the same files, one ``pread`` per (channel, slice) row range, readahead off
  npy-willneed  the same files memory-mapped without readahead, the patch's row ranges
                requested up front with ``madvise(MADV_WILLNEED)``, then one copy
  npy-load      the same files loaded whole with ``np.load`` (a naive loader)
  blosc2        .b2nd, as nnU-Net v2 stores it: LZ4HC level 5, NOFILTER or SHUFFLE picked by
                trial per array, chunks/blocks from nnU-Net's rule for the configuration's
                patch size (one copy of the dataset per patch size), read with
                ``blosc2.open(mmap_mode="r")`` and one decompression thread per worker.
                Skipped, with a note, when ``import blosc2`` fails.

Warm: the files are in the page cache (read once before). Cold: the case's files are evicted
before every read, with ``posix_fadvise(DONTNEED)`` per file (default: it only touches our
files) or ``sync; echo 3 > /proc/sys/vm/drop_caches`` (``--cold drop_caches``, root only).

    python benchmarks/bench_storage.py                                   # ~2.5 min
    /tmp/nnunet_venv/bin/python benchmarks/bench_storage.py              # with blosc2
    python benchmarks/bench_storage.py --cases 2 --reads 10 --dir /some/disk
    /tmp/nnunet_venv/bin/python benchmarks/bench_storage.py --resampled     # continuous intensities
    /tmp/nnunet_venv/bin/python benchmarks/bench_storage.py --cold drop_caches

Prints, per format and patch size: median ms per read (warm and cold), disk MiB actually
read per cold read (/proc/self/io), write seconds per case, and size on disk. Results and
the storage conclusion: BENCHMARKS.md, section Preprocessing.
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    import blosc2
except ImportError as exc:  # the system python has no blosc2; nnU-Net's venv does
    blosc2 = None
    BLOSC2_MISSING = str(exc)

MB = 1024 * 1024
SHAPE = (200, 400, 400)
CHANNELS = 4
PATCHES = {"128x128x128": (128, 128, 128), "40x96x112": (40, 96, 112)}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def make_case(seed: int, resampled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A preprocessed-like case: float32 (4, *SHAPE) data and int16 (1, *SHAPE) label.

    Default: target spacing = original, so intensities stay quantized (HU steps), as in a
    3d_fullres configuration without resampling. ``resampled``: built on a 0.8x coarser grid
    and resampled to SHAPE with the library (cubic images, one-hot labels), as when the plan
    resamples; the intensities are then continuous and compress less.
    """
    from bench_preprocess_memory import CT_INTENSITY, build_case

    from AutoSegLib.preprocessing.normalization import normalize_ct, normalize_zscore
    from AutoSegLib.preprocessing.resampling import resample_image, resample_label

    source = tuple(int(round(0.8 * s)) for s in SHAPE) if resampled else SHAPE
    spacing = tuple(e / n for e, n in zip((300.0, 400.0, 400.0), source))
    to_shape = (lambda a: resample_image(a, SHAPE, 3)) if resampled else (lambda a: a)
    data = np.empty((CHANNELS, *SHAPE), np.float32)
    ct, label = build_case(source, spacing, "CT", seed=seed)
    data[0] = to_shape(normalize_ct(ct, CT_INTENSITY["0"]))
    del ct
    body = None
    for c in range(1, CHANNELS):
        mr, _ = build_case(source, spacing, "MR", seed=seed * 10 + c)
        if body is None:
            body = mr != 0
        data[c] = to_shape(normalize_zscore(mr, body))
        del mr
    seg = label.astype(np.int16)
    seg[(seg == 0) & ~body] = -1
    if resampled:
        seg = resample_label(seg, SHAPE, 1)
    return data, seg[None]


# --------------------------------------------------------------------------------------------
# blosc2 parameters as nnU-Net v2 computes them (nnunetv2.training.dataloading.nnunet_dataset)
# --------------------------------------------------------------------------------------------

def blosc2_params(image_size, patch_size, bytes_per_pixel=4, max_block=128 * 1024, max_chunk=6 * MB,
                  ratio=1.5):
    """(blocks, chunks) for a (c, z, y, x) array: a port of nnU-Net v2's ``comp_blosc2_params``."""
    def ceil_pow2(n):
        return 1 if n <= 1 else 1 << (n - 1).bit_length()

    def prev_pow2_below(n):
        return 1 if n <= 1 else 1 << ((n - 1).bit_length() - 1)

    def nbytes(shape):
        return math.prod(shape) * bytes_per_pixel

    image = tuple(image_size[1:])
    target = tuple(max(1, min(image[a], int(math.floor(ratio * patch_size[a])))) for a in range(3))
    block = [1] + [min(ceil_pow2(p), s) for p, s in zip(patch_size, image)]
    while nbytes(block) > min(max_block, max_chunk):
        axes = [a for a in range(3) if block[a + 1] > 1]
        axis = max(axes, key=lambda a: (block[a + 1] / target[a], a))
        block[axis + 1] = prev_pow2_below(block[axis + 1])
    chunk = block.copy()
    while True:
        candidates = []
        for a in range(3):
            if patch_size[a] == 1 or chunk[a + 1] >= image[a] or chunk[a + 1] >= target[a]:
                continue
            candidate = chunk.copy()
            candidate[a + 1] = min(candidate[a + 1] + block[a + 1], image[a], target[a])
            if candidate[a + 1] == chunk[a + 1] or nbytes(candidate) > max_chunk:
                continue
            candidates.append((chunk[a + 1] / target[a], -image[a], a, -nbytes(candidate), candidate))
        if not candidates:
            break
        chunk = min(candidates, key=lambda item: item[:4])[4]
    return tuple(block), tuple(chunk)


def _blosc2_filter(array, blocks, chunks, cparams):
    """NOFILTER or SHUFFLE, whichever compresses a centred chunk-sized slab better (as nnU-Net)."""
    slab_shape = [min(c, s) for c, s in zip(chunks, array.shape)]
    slab = np.ascontiguousarray(array[tuple(slice((s - n) // 2, (s - n) // 2 + n)
                                            for s, n in zip(array.shape, slab_shape))])
    trial_blocks = tuple(max(1, min(b, n)) for b, n in zip(blocks, slab_shape))
    best, best_bytes = blosc2.Filter.NOFILTER, None
    for f in (blosc2.Filter.NOFILTER, blosc2.Filter.SHUFFLE):
        compressed = blosc2.asarray(slab, chunks=tuple(slab_shape), blocks=trial_blocks,
                                    cparams={**cparams, "filters": [f]})
        if best_bytes is None or compressed.schunk.cbytes < best_bytes:
            best, best_bytes = f, compressed.schunk.cbytes
    return best


# --------------------------------------------------------------------------------------------
# Formats: write(folder, name, data, seg) and read(folder, name, slices) -> (data patch, seg patch)
# --------------------------------------------------------------------------------------------

def write_npy(folder: Path, name: str, data, seg) -> list[Path]:
    paths = [folder / f"{name}.npy", folder / f"{name}_seg.npy"]
    for path, array in zip(paths, (data, seg)):
        with open(path, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
    return paths


def read_npy_mmap(folder: Path, name: str, slices):
    data = np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    seg = np.load(folder / f"{name}_seg.npy", mmap_mode="r", allow_pickle=False)
    return np.array(data[slices]), np.array(seg[slices])


def _npy_header(handle):
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(handle)
    assert not fortran
    return shape, dtype, handle.tell()


def _open_npy_random(path: Path) -> np.ndarray:
    """A read-only memory map of a .npy with readahead off (``madvise(MADV_RANDOM)``): a page
    fault reads that page, not a readahead window (``read_ahead_kb``: often 128 KiB, here 8 MiB)."""
    with open(path, "rb") as handle:
        shape, dtype, offset = _npy_header(handle)
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, dtype, buffer=mapped, offset=offset)


def read_npy_mmap_random(folder: Path, name: str, slices):
    data = _open_npy_random(folder / f"{name}.npy")
    seg = _open_npy_random(folder / f"{name}_seg.npy")
    return np.array(data[slices]), np.array(seg[slices])


def _willneed_patch(path: Path, slices) -> np.ndarray:
    """Memory map without readahead, then ``madvise(MADV_WILLNEED)`` on exactly the (channel,
    slice) row ranges of the patch: the kernel reads them all at once (queued I/O), then one copy."""
    with open(path, "rb") as handle:
        shape, dtype, offset = _npy_header(handle)
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_RANDOM)
    row = shape[3] * dtype.itemsize
    zs, ys = slices[1], slices[2]
    for c in range(shape[0])[slices[0]]:
        for z in range(zs.start, zs.stop):
            start = offset + ((c * shape[1] + z) * shape[2] + ys.start) * row
            aligned = start - start % mmap.PAGESIZE
            mapped.madvise(mmap.MADV_WILLNEED, aligned, start + (ys.stop - ys.start) * row - aligned)
    return np.array(np.ndarray(shape, dtype, buffer=mapped, offset=offset)[slices])


def read_npy_willneed(folder: Path, name: str, slices):
    return _willneed_patch(folder / f"{name}.npy", slices), _willneed_patch(folder / f"{name}_seg.npy", slices)


def _pread_patch(path: Path, slices) -> np.ndarray:
    """One ``pread`` per (channel, slice) of the rows the patch spans; readahead off for the file."""
    with open(path, "rb") as handle:
        shape, dtype, offset = _npy_header(handle)
        fd = handle.fileno()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        channels = range(shape[0])[slices[0]]
        zs, ys, xs = slices[1:]
        row = shape[3] * dtype.itemsize
        out = np.empty((len(channels), zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start), dtype)
        rows = np.empty((ys.stop - ys.start, shape[3]), dtype)
        for i, c in enumerate(channels):
            for j, z in enumerate(range(zs.start, zs.stop)):
                start = offset + ((c * shape[1] + z) * shape[2] + ys.start) * row
                if os.preadv(fd, [rows], start) != rows.nbytes:
                    raise OSError(f"{path}: short read")
                out[i, j] = rows[:, xs]
    return out


def read_npy_pread(folder: Path, name: str, slices):
    return _pread_patch(folder / f"{name}.npy", slices), _pread_patch(folder / f"{name}_seg.npy", slices)


def read_npy_load(folder: Path, name: str, slices):
    data = np.load(folder / f"{name}.npy", allow_pickle=False)
    seg = np.load(folder / f"{name}_seg.npy", allow_pickle=False)
    return np.array(data[slices]), np.array(seg[slices])


def make_blosc2_writer(patch):
    def write(folder: Path, name: str, data, seg) -> list[Path]:
        paths = [folder / f"{name}.b2nd", folder / f"{name}_seg.b2nd"]
        for path, array in zip(paths, (data, seg)):
            blocks, chunks = blosc2_params(array.shape, patch, bytes_per_pixel=array.itemsize)
            cparams = {"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 4}
            cparams["filters"] = [_blosc2_filter(array, blocks, chunks, cparams)]
            blosc2.asarray(np.ascontiguousarray(array), urlpath=str(path), chunks=chunks, blocks=blocks,
                           cparams=cparams, mode="w")
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
        return paths
    return write


def read_blosc2(folder: Path, name: str, slices):
    dparams = {"nthreads": 1}
    data = blosc2.open(str(folder / f"{name}.b2nd"), mode="r", dparams=dparams, mmap_mode="r")
    seg = blosc2.open(str(folder / f"{name}_seg.b2nd"), mode="r", dparams=dparams, mmap_mode="r")
    return data[slices], seg[slices]


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

def evict(paths, method: str) -> None:
    if method == "drop_caches":
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(64 * MB):
                pass


def disk_read_bytes() -> int:
    try:
        with open("/proc/self/io") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("read_bytes"))
    except (OSError, StopIteration):
        return 0


def random_slices(rng, patch):
    start = [int(rng.integers(0, s - p + 1)) for s, p in zip(SHAPE, patch)]
    return (slice(None),) + tuple(slice(a, a + p) for a, p in zip(start, patch))


def time_reads(reader, folder, names, files, patch, n, rng, cold: str | None):
    times, read_bytes = [], []
    for i in range(n):
        name = names[i % len(names)]
        slices = random_slices(rng, patch)
        if cold:
            evict(files[name], cold)
        before = disk_read_bytes()
        start = time.perf_counter()
        data, seg = reader(folder, name, slices)
        times.append(time.perf_counter() - start)
        read_bytes.append(disk_read_bytes() - before)
        assert data.shape == (CHANNELS, *patch) and seg.shape == (1, *patch)
    return statistics.median(times), statistics.median(read_bytes)


def cold_method(requested: str) -> str:
    if requested != "drop_caches":
        return "fadvise"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return "drop_caches"
    except OSError as exc:
        print(f"note: cannot drop the page cache ({exc}); using posix_fadvise(DONTNEED) per file instead")
        return "fadvise"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--reads", type=int, default=24, help="reads per format and patch size (warm)")
    parser.add_argument("--cold-reads", type=int, default=9)
    parser.add_argument("--full-reads", type=int, default=3, help="reads for npy-load (whole case per read)")
    parser.add_argument("--cold", choices=("fadvise", "drop_caches"), default="fadvise")
    parser.add_argument("--dir", help="where to write the cases (a disk, not tmpfs); default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the written files")
    parser.add_argument("--resampled", action="store_true",
                        help="cases resampled by the library (continuous intensities) instead of quantized")
    args = parser.parse_args()
    cold = cold_method(args.cold)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, "
          f"blosc2 {blosc2.__version__ if blosc2 else 'not available'}; {os.cpu_count()} CPUs; "
          f"{args.cases} {'resampled' if args.resampled else 'quantized (not resampled)'} cases of float32 "
          f"{(CHANNELS, *SHAPE)} + int16 {(1, *SHAPE)}; cold = {cold}")
    if blosc2 is None:
        print(f"blosc2 skipped: import failed ({BLOSC2_MISSING}); run with an interpreter that has it "
              "(e.g. /tmp/nnunet_venv/bin/python) to include it")
    root = Path(tempfile.mkdtemp(prefix="bench_storage_", dir=args.dir))
    try:
        formats = {"npy": (write_npy, {"npy-mmap": read_npy_mmap, "npy-random": read_npy_mmap_random,
                                       "npy-pread": read_npy_pread, "npy-willneed": read_npy_willneed,
                                       "npy-load": read_npy_load}, None)}
        if blosc2 is not None:
            blosc2.set_nthreads(1)
            for label, patch in PATCHES.items():
                formats[f"blosc2 {label}"] = (make_blosc2_writer(patch), {"blosc2": read_blosc2}, label)
        names = [f"case_{i:03d}" for i in range(args.cases)]
        files = {key: {} for key in formats}
        write_seconds = {key: [] for key in formats}
        raw = 0
        for i, name in enumerate(names):
            data, seg = make_case(seed=i, resampled=args.resampled)
            raw += data.nbytes + seg.nbytes
            for key, (writer, _, _) in formats.items():
                folder = root / key.replace(" ", "_")
                folder.mkdir(exist_ok=True)
                start = time.perf_counter()
                files[key][name] = writer(folder, name, data, seg)
                write_seconds[key].append(time.perf_counter() - start)
            del data, seg
        rows = []
        rng = np.random.default_rng(0)
        for key, (_, readers, only_patch) in formats.items():
            folder = root / key.replace(" ", "_")
            size = sum(p.stat().st_size for paths in files[key].values() for p in paths)
            for reader_name, reader in readers.items():
                for label, patch in PATCHES.items():
                    if only_patch and label != only_patch:
                        continue
                    full = reader_name == "npy-load"
                    for name in names:
                        warm(files[key][name])
                    warm_s, _ = time_reads(reader, folder, names, files[key], patch,
                                           args.full_reads if full else args.reads, rng, None)
                    cold_s, cold_bytes = time_reads(reader, folder, names, files[key], patch,
                                                    args.full_reads if full else args.cold_reads, rng, cold)
                    rows.append((reader_name, label, warm_s, cold_s, cold_bytes,
                                 statistics.median(write_seconds[key]), size, raw))
        head = (f"{'format':12s} {'patch':12s} {'warm ms':>8s} {'cold ms':>8s} {'cold MiB read':>13s} "
                f"{'write s/case':>12s} {'disk MiB':>9s} {'ratio':>6s}")
        print(head)
        print("-" * len(head))
        for reader_name, label, warm_s, cold_s, cold_bytes, write_s, size, raw_bytes in rows:
            print(f"{reader_name:12s} {label:12s} {1000 * warm_s:8.1f} {1000 * cold_s:8.1f} {cold_bytes / MB:13.1f} "
                  f"{write_s:12.2f} {size / MB:9.0f} {raw_bytes / size:6.2f}")
        print(f"medians over reads ({args.reads} warm / {args.cold_reads} cold per row; npy-load {args.full_reads}); "
              "a read = open the case + copy one patch of data and label; ratio = raw bytes / bytes on disk")
    finally:
        if args.keep:
            print(f"files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
