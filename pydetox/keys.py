"""Every GGUF metadata key and `general.type` value pydetox writes, in one place (GGUF's own keys come from
gguf.Keys). Models, plans, adapters, calibrators and alignments name their provenance with these."""

from __future__ import annotations

# Provenance of every model and adapter pydetox writes.
TOOL = "pydetox.version"
SOURCE_NAME = "pydetox.source.name"
SOURCE_SHA256 = "pydetox.source.sha256"
TARGET_TYPE = "pydetox.target_type"
PLAN_SHA256 = "pydetox.plan.sha256"  # of the plan file applied (in a model); compare PLAN_CONTENT_SHA256
PLAN_METHOD = "pydetox.plan.method"  # in a model, and in a plan file
PLAN_PARAMS = "pydetox.plan.params"  # in a model, and in a plan file

# Edit plan files (pydetox.plan).
PLAN_TYPE = "pydetox.edit_plan"  # general.type
PLAN_VERSION = "pydetox.plan.version"
PLAN_EDITS = "pydetox.plan.edits"
PLAN_MODEL = "pydetox.plan.model"
PLAN_CONTENT_SHA256 = "pydetox.plan.content_sha256"

# Calibrators and their alignments (pydetox.calibrate, pydetox.fusion).
CALIBRATOR_TARGET = "pydetox.calibrator.target"
CALIBRATOR_LAYERS = "pydetox.calibrator.layers"
ALIGNMENT_TYPE = "pydetox.calibrator_alignment"  # general.type
ALIGNMENT_VERSION = "pydetox.alignment.version"
ALIGNMENT_INFO = "pydetox.alignment.info"
ALIGNMENT_VOCAB = "pydetox.alignment.vocab_sha256"
ALIGNMENT_EPS = "pydetox.alignment.eps"
