"""The enrollment gallery: the enrolled classes, their features and the fitted head, on disk.

Three modules with one job each: `state` (classes, features, fitting, prediction: `Gallery`),
`calibration` (the open-set threshold), `storage` (the file format, validation on load through
`validate`, atomic saves with `.prev`, the lock, restore). The names below are the public API.
"""

from mtl_edge.gallery.calibration import (
    CALIBRATION_BUDGET,
    MAX_KNOWN_FOLDS,
    MAX_UNKNOWN_FOLDS,
    calibrate_threshold,
)
from mtl_edge.gallery.state import (
    FEATURE_DTYPES,
    UNKNOWN,
    EnrolledClass,
    Gallery,
    Prediction,
    check_class_name,
)
from mtl_edge.gallery.storage import (
    GALLERY_SCHEMA,
    GALLERY_VERSION,
    MAX_GALLERY_BYTES,
    SAVE_PAUSE_ENV,
    edit_gallery,
    lock_path,
    prev_path,
    restore_previous,
)

__all__ = [
    "CALIBRATION_BUDGET",
    "FEATURE_DTYPES",
    "GALLERY_SCHEMA",
    "GALLERY_VERSION",
    "MAX_GALLERY_BYTES",
    "MAX_KNOWN_FOLDS",
    "MAX_UNKNOWN_FOLDS",
    "SAVE_PAUSE_ENV",
    "UNKNOWN",
    "EnrolledClass",
    "Gallery",
    "Prediction",
    "calibrate_threshold",
    "check_class_name",
    "edit_gallery",
    "lock_path",
    "prev_path",
    "restore_previous",
]
