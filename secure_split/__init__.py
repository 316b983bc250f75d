"""secure_split: a PyTorch compiler plugin for confidential split inference.

    torch.compile(model, backend="secure_split", fullgraph=True, options={"masking": "float"})
"""

from .api import split
from .backend import secure_split_backend
from .config import SplitConfig
from .program import SplitProgram, last_program
from .report import PartitionReport
from .trace import BoundaryTrace, trace_boundary

__all__ = [
    "BoundaryTrace",
    "PartitionReport",
    "SplitConfig",
    "SplitProgram",
    "last_program",
    "secure_split_backend",
    "split",
    "trace_boundary",
]
__version__ = "0.1.0"
