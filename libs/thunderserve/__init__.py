"""ThunderServe: disaggregated LLM serving on heterogeneous GPUs."""

__version__ = "0.1.0"
