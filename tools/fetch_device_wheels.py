"""Download what the GPU machine lacks for issue 16's sweep into DIR (default .whl): timm at the tested version and
the peers of `visattn bench --peers`, with their pure-Python requirements, as Python 3.12 wheels.

    python tools/fetch_device_wheels.py [DIR]      # here, where PyPI is reachable (a few MB)

The device tool then carries DIR (`carry: [".whl"]`) and tools/device_session.sh installs it into /tmp/site (the
machine reaches no registry). Nothing here is committed: .whl/ is git-ignored.
"""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

dest = Path(sys.argv[1] if len(sys.argv) > 1 else ".whl")
dest.mkdir(parents=True, exist_ok=True)
# On the GPU image already (KINDS.md's package list): never fetched.
PRESENT = {
    "torch",
    "numpy",
    "einops",
    "safetensors",
    "pyyaml",
    "huggingface-hub",
    "torchvision",
    "scipy",
    "packaging",
    "filelock",
    "typing-extensions",
    "tqdm",
    "pillow",
    "requests",
    "sympy",
    "networkx",
    "jinja2",
    "fsspec",
    "hypothesis",
    "pytest",
    "matplotlib",
    "regex",
    "triton",
    "setuptools",
}
todo = [
    "timm==1.0.31",
    "lambda-networks",
    "linear-attention-transformer",
    "kronecker-attention-pytorch",
    "isab-pytorch",
    "performer-pytorch",
    "linformer",
    "nystrom-attention",
    "memory-compressed-attention",
    "reformer-pytorch",
    "compressive-transformer-pytorch",
    "product-key-memory",
]
done = set()


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


while todo:
    spec = todo.pop()
    name = norm(re.split(r"[<>=!~ ;\[]", spec)[0])
    if name in done or name in PRESENT:
        continue
    done.add(name)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
    ]
    cmd += ["3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64", "--platform", "any"]
    r = subprocess.run([*cmd, "-d", str(dest), spec], capture_output=True, text=True)
    if r.returncode:  # the sweep records a missing peer as "not installed": say so, go on
        print("failed", spec, r.stderr.strip().splitlines()[-1:])
        continue
    whl = next((p for p in dest.glob("*.whl") if norm(p.name.split("-")[0]) == name), None)
    if whl is None:
        print("no wheel for", spec)
        continue
    meta = next(n for n in zipfile.ZipFile(whl).namelist() if n.endswith("METADATA"))
    for line in zipfile.ZipFile(whl).read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            todo.append(line.split(":", 1)[1].strip())
print(sorted(p.name for p in dest.glob("*.whl")))
