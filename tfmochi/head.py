"""Deprecated names of `tfmochi.objective` (the contrastive objective used to be called "head").

"Head" now means only the projection MLP (`models.build_projection_head`, `--head_bn`). These
aliases keep code written against the old names importing; new code uses `tfmochi.objective`.
"""

from tfmochi.objective import LABEL_MODES  # noqa: F401
from tfmochi.objective import ObjectiveConfig as HeadConfig  # noqa: F401
from tfmochi.objective import ObjectiveOutput as HeadOutput  # noqa: F401
from tfmochi.objective import contrastive_objective as contrastive_head  # noqa: F401
from tfmochi.objective import same_entry_mask  # noqa: F401
