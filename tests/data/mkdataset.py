# A copy of ../shared/datasets/mkdataset.py (the steering repository's benchmark dataset), so a
# clone on its own (CI) can make the same dataset; maas_tests::bench::dataset_script prefers the
# shared original when it is there. Keep the two identical.
#!/usr/bin/env python3
"""The backup benchmark dataset: deterministic, about 2.1 GB in about 3,000 files.

  mkdataset.py create DIR [--scale S]   write the dataset into DIR (must not exist or be empty)
  mkdataset.py mutate DIR [--seed N]    apply one day's changes (about 4-5% of the bytes)

Contents (scale 1.0):
  logs/      12 log-like text files of 120 MiB (every line distinct; zstd -3 compresses them about 3x)
  small/     3,000 files of 1-40 KiB in 60 folders (text, json, binary), with a few
             symlinks, one hard link pair, an empty file, a sparse file and odd modes
  images/    4 files of 128 MiB of random bytes (incompressible, like media or encrypted data)
A mutation rewrites blocks inside two images and one log in place, appends to a log, rewrites
150 small files, deletes 100, adds 200 and renames one folder. The same seed gives the same
bytes on every machine (Python's random module, no other dependency), so every tool and every
run compares the same work. --scale 0.05 makes a quick 100 MB version for tests.
"""
import argparse, hashlib, os, random, sys

MiB = 1 << 20
WORDS = ("request response session volume snapshot export initiator target login logout read "
         "write flush commit seal clone pool chunk index overlay batch segment device ok error "
         "warning timeout retry connected disconnected user admin backup restore archive bucket "
         "object upload download latency throughput queue depth tier cache hit miss").split()
LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")


def log_block(rng, approx):
    out, n, t = [], 0, rng.randrange(1_700_000_000, 1_800_000_000)
    while n < approx:
        t += rng.randrange(0, 3)
        line = "%d.%03d %s [%s] %s id=%016x %s=%d\n" % (
            t, rng.randrange(1000), rng.choice(LEVELS), rng.choice(WORDS),
            " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 14))),
            rng.getrandbits(64), rng.choice(WORDS), rng.randrange(100000))
        out.append(line)
        n += len(line)
    return "".join(out).encode()


def write_log(path, rng, size):
    with open(path, "wb") as f:
        left = size
        while left > 0:
            b = log_block(rng, min(left, MiB))[:left]
            f.write(b)
            left -= len(b)


def write_random(path, rng, size):
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 4 * MiB)
            f.write(rng.randbytes(n))
            left -= n


def small_content(rng):
    size = rng.randrange(1024, 40 * 1024)
    kind = rng.randrange(3)
    if kind == 0:
        return log_block(rng, size)[:size]
    if kind == 1:
        items = ",".join('"%s": %d' % (rng.choice(WORDS), rng.randrange(10**6)) for _ in range(size // 16))
        return ("{" + items + "}").encode()[:size]
    return rng.randbytes(size)


def create(root, scale):
    rng = random.Random(20261121)
    os.makedirs(root, exist_ok=True)
    if os.listdir(root):
        sys.exit("%s is not empty" % root)
    for d in ("logs", "small", "images"):
        os.makedirs(os.path.join(root, d))
    for i in range(12):
        write_log(os.path.join(root, "logs", "app-%02d.log" % i), rng, int(120 * MiB * scale))
    for i in range(4):
        write_random(os.path.join(root, "images", "disk-%d.img" % i), rng, int(128 * MiB * scale))
    nsmall = max(60, int(3000 * scale))
    for i in range(nsmall):
        d = os.path.join(root, "small", "dir-%02d" % (i % 60))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "file-%04d.dat" % i), "wb") as f:
            f.write(small_content(rng))
    s = os.path.join(root, "small")
    os.symlink("dir-00/file-0000.dat", os.path.join(s, "link-to-first"))
    os.symlink("../logs", os.path.join(s, "dir-01", "logs-link"))
    os.link(os.path.join(s, "dir-02", "file-0002.dat"), os.path.join(s, "dir-02", "hardlink.dat"))
    open(os.path.join(s, "empty"), "wb").close()
    with open(os.path.join(s, "sparse.bin"), "wb") as f:
        f.seek(64 * MiB)
        f.write(b"end")
    os.chmod(os.path.join(s, "dir-03", "file-0003.dat"), 0o600)
    os.chmod(os.path.join(s, "dir-04", "file-0004.dat"), 0o755)
    os.utime(os.path.join(s, "dir-05", "file-0005.dat"), (1_000_000_000, 1_000_000_000))


def mutate(root, seed):
    rng = random.Random(seed)
    for name in ("disk-0.img", "disk-2.img"):
        with open(os.path.join(root, "images", name), "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            for _ in range(8):
                f.seek(rng.randrange(0, max(1, size - 2 * MiB)) & ~4095)
                f.write(rng.randbytes(2 * MiB))
    with open(os.path.join(root, "logs", "app-03.log"), "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        for _ in range(4):
            f.seek(rng.randrange(0, max(1, size - MiB)))
            f.write(log_block(rng, MiB)[:MiB])
    with open(os.path.join(root, "logs", "app-07.log"), "ab") as f:
        f.write(log_block(rng, 24 * MiB))
    files = sorted(os.path.join(dp, n) for dp, _, ns in os.walk(os.path.join(root, "small"))
                   for n in ns if n.startswith("file-"))
    rng.shuffle(files)
    for p in files[:150]:
        with open(p, "wb") as f:
            f.write(small_content(rng))
    for p in files[150:250]:
        os.unlink(p)
    os.makedirs(os.path.join(root, "small", "new-%d" % seed), exist_ok=True)
    for i in range(200):
        with open(os.path.join(root, "small", "new-%d" % seed, "added-%03d.dat" % i), "wb") as f:
            f.write(small_content(rng))
    src = os.path.join(root, "small", "dir-59")
    if os.path.isdir(src):
        os.rename(src, os.path.join(root, "small", "dir-59-renamed-%d" % seed))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create"); c.add_argument("dir"); c.add_argument("--scale", type=float, default=1.0)
    m = sub.add_parser("mutate"); m.add_argument("dir"); m.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.cmd == "create":
        create(a.dir, a.scale)
    else:
        mutate(a.dir, a.seed)


if __name__ == "__main__":
    main()
