"""The allocator setting, measured where it matters: the paste-back in a worker thread, as the
CPU replica runs it, in a fresh process each time (the setting is process-wide)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PASTES = """
import json, resource, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from bench.common import ASTRONAUT_FACE, photo
from serve_app.deployments.heap import keep_freed_memory
from serve_app.engines import face_geometry as geo
from serve_app.cpu.paste import FoundFaces, paste_faces

applied = keep_freed_memory() if sys.argv[1] == "keep" else None
img = photo()
_, landmarks = geo.faces_of(ASTRONAUT_FACE)
crop, affine = geo.align_face(img, landmarks[0])
parsing = np.zeros((512, 512), np.int64)
parsing[100:450, 80:430] = 1
mask = geo.parse_mask(parsing)

def faults_of_one_paste():
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    paste_faces(img, FoundFaces([crop], [affine], 1), [crop], [mask], scale=2)
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

with ThreadPoolExecutor(2) as pool:
    faults = [pool.submit(faults_of_one_paste).result() for _ in range(12)]
print(json.dumps({"applied": applied, "faults": faults[4:]}))  # after the first buffers are made
"""


def _pastes(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PASTES, mode], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kept_memory_spares_the_paste_back_its_page_faults():
    kept = _pastes("keep")
    assert kept["applied"] is True
    # Each paste-back touches about 30 MB of buffers; reused, they fault in no new page.
    assert max(kept["faults"]) < 50
    # glibc's defaults fault thousands of pages in every time (7,400 measured)
    assert min(_pastes("default")["faults"]) > 1000
