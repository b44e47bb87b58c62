"""ThunderServe planner: two-level scheduling (tabu search + LP) of heterogeneous GPU clusters."""

from .catalog import Catalog, GPUSpec, default_catalog, get_gpu
from .cluster import Cluster, Node
from .costmodel import CODEC_RATIO, Calibration
from .model import ModelSpec
from .planner import Planner
from .workload import Workload

__all__ = ["Calibration", "Catalog", "CODEC_RATIO", "Cluster", "GPUSpec", "ModelSpec", "Node", "Planner",
           "Workload", "default_catalog", "get_gpu"]
