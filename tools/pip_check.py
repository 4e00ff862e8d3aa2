"""`pip check`, less what the packages installed without their dependencies declare and do not
need here: every other broken requirement still fails it.

Why: invisible-watermark declares opencv-python, whose `cv2` module the headless build we install
(opencv-python-headless, no GUI libraries) already provides under another name, and its RivaGAN
method's onnx runtime, which the DWT-DCT-SVD watermark never loads. Installing them would add a
second OpenCV with X11 libraries to every image. tools/lock.py does not follow these requirements
either. Standard library only: the container's build stage runs it before anything else is there.

    python tools/pip_check.py
"""

from __future__ import annotations

import re
import subprocess
import sys

# Per package installed without its dependencies, the requirements it declares and does not need.
WITHOUT_DEPENDENCIES = {"invisible-watermark": {"opencv-python", "onnx", "onnxruntime"}}


def unmet(report: str) -> list[str]:
    """The lines of `pip check`'s report that WITHOUT_DEPENDENCIES does not excuse."""
    left = []
    for line in report.splitlines():
        found = re.match(r"(\S+) \S+ requires (\S+?),", line)
        if not (found and found[2].lower() in WITHOUT_DEPENDENCIES.get(found[1].lower(), set())):
            left.append(line)
    return [line for line in left if line.strip() and line != "No broken requirements found."]


def main() -> None:
    ran = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    if problems := unmet(ran.stdout + ran.stderr):
        print("\n".join(problems))
        raise SystemExit(1)
    print("No broken requirements found (tools/pip_check.py: invisible-watermark's unneeded ones excused).")


if __name__ == "__main__":
    main()
