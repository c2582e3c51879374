"""``python -m bnfused``: versions, devices, and which backends can run here (and why not)."""

from __future__ import annotations

import platform

import torch

import bnfused
from bnfused import backends


def main() -> None:
    python, triton = platform.python_version(), bnfused.package_version("triton")
    print(f"bnfused {bnfused.__version__}  python {python}  torch {torch.__version__}  triton {triton}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("cuda: no GPU visible")
    print(f"default backend: {backends.get_backend()!r} (set_backend() or BNFUSED_BACKEND)")
    for device in devices:
        print(f"\n{device}:")
        for name, reason in backends.availability(device).items():
            print(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
        try:
            print(f"  auto ->     {backends.resolve('auto', device)}")
        except Exception as exc:  # report, never crash the diagnostic
            print(f"  auto ->     error: {exc}")


if __name__ == "__main__":
    main()
