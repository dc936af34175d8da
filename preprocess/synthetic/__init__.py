"""Synthetic KiTS19-format CT cases: real or analytic kidney label maps with a CT rendered around.

The KiTS19 CT images are not available on every machine (and may not be redistributed), so
tests, benchmarks, demos and training need data with the same format and similar statistics.
This subpackage is a simulator: it writes ``OUT/case_XXXXX/imaging.nii.gz`` (int16 HU) and
``segmentation.nii.gz`` (uint8 0/1/2) through :func:`preprocess.kits.write_case`, from one of two
anatomy sources:

* ``--labels DIR``: real KiTS19 label maps (:mod:`.labels`). Each output keeps its label map
  exactly (same case id, shape and spacing) and gets a CT rendered around its kidneys.
* no ``--labels``: analytic anatomy (:mod:`.analytic`): two rotated, bean-shaped ellipsoid
  kidneys and, in most cases, tumors from a few mm to several cm.

Either way :func:`render_ct` (:mod:`.render`) builds the rest of the abdomen around the labelled
kidneys (:mod:`.anatomy`: body outline, spine, organ placement; :mod:`.organs`: painting skin,
fat, muscle wall, spine, psoas and back muscles, aorta and IVC, liver with vessels, gallbladder,
spleen, lung bases, ribs, bowel with wall, fluid, stool and gas) and then blurs it, adds a smooth
gain (bias) field and noise (:mod:`.scanner`). The intensities (:mod:`.appearance`) follow a
contrast-enhanced portal/nephrographic-phase abdominal CT; tumor intensities overlap medulla,
muscle, bowel and liver so that no HU threshold segments a tumor. Domain randomisation
(:mod:`.randomize`) draws per case another phase, tissue HU, tumor look, noise, blur, kernel and
habitus, so that a model trained on the result learns kidneys rather than one renderer's look.
:mod:`.cases` writes a dataset (MPI ranks share the cases) and its ``synthetic.json``;
:mod:`.cli` is the command line.
"""

from preprocess.synthetic.analytic import analytic_case
from preprocess.synthetic.cases import case_rng, case_style, generate
from preprocess.synthetic.cli import build_parser, main
from preprocess.synthetic.labels import find_label_files, load_label_map
from preprocess.synthetic.randomize import RandomizeConfig, draw_style
from preprocess.synthetic.render import render_ct

__all__ = [
    "RandomizeConfig",
    "analytic_case",
    "build_parser",
    "case_rng",
    "case_style",
    "draw_style",
    "find_label_files",
    "generate",
    "load_label_map",
    "main",
    "render_ct",
]
