"""A face database, end to end: train on some people, enrol new people from one photo each,
then identify and verify, on face photos this script makes.

    python examples/face_database.py [--out runs/faces] [--epochs 6]

1. 60 synthetic identities × 10 photos (each identity has its own face geometry and colouring;
   each photo varies pose, expression, lighting and background). The first 40 train the model.
2. ``deepmetric train`` learns an embedding on the 40 training people.
3. ``deepmetric verify`` calibrates a same/different threshold on 10 other people (never
   trained on), reading the true accept rate at a false accept rate of 1e-2.
4. ``deepmetric index build`` + ``enroll`` store ONE photo of each of the last 10 people: a new
   person is enrolled without retraining.
5. ``deepmetric search`` identifies their other 9 photos each (nearest enrolled face), and
   ``verify --a --b`` decides for two photos with the calibrated threshold.

The same commands work on a folder of real face photos (any format Pillow reads, PGM included):
one sub-folder per person.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from deepmetric.cli import main
from deepmetric.data.synthetic import make_faces


def _move(people: list[Path], target: Path, photos: slice) -> None:
    for person in people:
        (target / person.name).mkdir(parents=True, exist_ok=True)
        for photo in sorted(person.iterdir())[photos]:
            photo.rename(target / person.name / photo.name)


def run(out: Path, epochs: int, progress: bool = True) -> dict[str, float]:
    """Returns the identification accuracy of the new people's photos and the verification
    record (AUC, TPR at FPR 1e-2) on people never trained on."""
    if out.exists():
        shutil.rmtree(out)
    faces = out / "faces"
    make_faces(faces, identities=60, photos=10, size=96, seed=0)
    people = sorted(faces.iterdir())
    calibration, enrolment, probes = out / "calibration", out / "enrolment", out / "probes"
    _move(people[40:50], calibration, slice(None))
    _move(people[50:], enrolment, slice(0, 1))  # one photo per new person
    _move(people[50:], probes, slice(None))
    for person in people[40:]:
        person.rmdir()

    run_dir = out / "run"
    no_progress = [] if progress else ["--no-progress"]
    status = main(
        ["train", "--dataset", f"folder:{faces}", "--out", str(run_dir), "--image-size", "64"]
        + ["--epochs", str(epochs), "--p", "10", "--k", "4", "--test-classes", "0.25"]
        + ["--val-classes", "0", *no_progress]
    )
    if status != 0:
        raise SystemExit(status)
    record = out / "verification.json"
    run_args = ["--run", str(run_dir)]
    main(["verify", *run_args, "--dataset", f"folder:{calibration}", "--target-fpr", "0.01"]
         + ["--json", str(record)])  # fmt: skip
    calibrated = json.loads(record.read_text())["calibration"]

    index = out / "people.index"
    main(["index", "build", *run_args, "--dataset", f"folder:{enrolment}", "--out", str(index)])
    hits = out / "identified.json"
    main(["search", "--index", str(index), *run_args, "--dataset", f"folder:{probes}"]
         + ["-k", "1", "--json", str(hits)])  # fmt: skip
    found = json.loads(hits.read_text())["queries"]
    accuracy = sum(q["neighbours"][0]["class_name"] == q["class_name"] for q in found) / len(found)
    print(f"\nidentified {accuracy:.2%} of {len(found)} photos of 10 people enrolled from one each")

    same = sorted((probes / people[50].name).iterdir())[:2]
    other = sorted((probes / people[51].name).iterdir())[0]
    threshold = str(calibrated["best_threshold"])
    for a, b in ((same[0], same[1]), (same[0], other)):
        main(["verify", *run_args, "--a", str(a), "--b", str(b), "--threshold", threshold])
    return {"identification": accuracy, "auc": calibrated["auc"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/faces"))
    parser.add_argument("--epochs", type=int, default=6)
    options = parser.parse_args()
    run(options.out, options.epochs)
