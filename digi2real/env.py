"""Start-up check of the install: exactly one onnxruntime and one OpenCV distribution.

insightface declares ``onnxruntime`` and ``opencv-python``, and that is what
``requirements.lock`` installs (the CPU default; ``pip check`` is clean). A CUDA host swaps
in ``onnxruntime-gpu``, a host without libGL ``opencv-python-headless`` (README "Install",
``scripts/setup_env.sh``). Each pair installs into the same module folder, so with both present
whichever was installed last silently wins (and uninstalling one breaks the other): nothing in
packaging metadata prevents it (installing insightface with its requirements after a swap
brings the twin back), so this check refuses it and says how to repair it.
"""

from __future__ import annotations

import importlib.metadata as md
import logging

logger = logging.getLogger(__name__)

ONNXRUNTIME = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")
OPENCV = (
    "opencv-python",
    "opencv-python-headless",
    "opencv-contrib-python",
    "opencv-contrib-python-headless",
)
# What requirements.lock installs: the distributions insightface declares.
DEFAULT = {"onnxruntime": "onnxruntime", "opencv": "opencv-python"}
ALTERNATIVE = {"onnxruntime": "onnxruntime-gpu on a CUDA host", "opencv": "opencv-python-headless"}


class EnvironmentClashError(RuntimeError):
    pass


def installed(names: tuple[str, ...]) -> list[str]:
    found = []
    for name in names:
        try:
            md.version(name)
        except md.PackageNotFoundError:
            continue
        found.append(name)
    return found


def problems() -> list[str]:
    out = []
    for family, names in (("onnxruntime", ONNXRUNTIME), ("opencv", OPENCV)):
        found = installed(names)
        default = DEFAULT[family]
        if len(found) > 1:
            # keep the one swapped in on purpose (the default came back beside it)
            keep = next(n for n in found if n != default)
            out.append(
                f"{len(found)} {family} distributions are installed ({', '.join(found)}); they "
                "share one module folder and the last installed wins. Keep one: `pip uninstall "
                f"-y {' '.join(found)} && pip install --no-deps {keep}=={md.version(keep)}` "
                f"(or reinstall {default} instead; README's Install section)"
            )
        elif not found:
            out.append(
                f"no {family} distribution installed: `pip install {default}` "
                f"(or {ALTERNATIVE[family]}; README's Install section)"
            )
    return out


def check_environment(*, strict: bool = True) -> list[str]:
    """Raise (strict) or log each install problem; returns them."""
    found = problems()
    if found and strict:
        raise EnvironmentClashError("\n".join(found))
    for line in found:
        logger.warning("%s", line)
    return found


if __name__ == "__main__":
    import sys

    issues = problems()
    for line in issues:
        print(f"error: {line}", file=sys.stderr)
    raise SystemExit(1 if issues else 0)
