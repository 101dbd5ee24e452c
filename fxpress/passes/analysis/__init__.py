from .shape_prop import ShapeProp, propagate_shapes
from .cost import CostAnalysis, node_cost, cost_by_module

__all__ = ["ShapeProp", "propagate_shapes", "CostAnalysis", "node_cost", "cost_by_module"]
