"""Keys under which the passes record their results in `node.meta` (the graph itself is not mutated)."""

TAINT = "secure_split.taint"  # "private" (user data), "secret" (private weights only) or "public"
SIDE = "secure_split.side"  # "enclave" or "gpu"
REASON = "secure_split.reason"  # why the node is on its side, for the report
PARAM_NAMES = "secure_split.param_names"  # on get_attr nodes: the model state (parameters, buffers) it derives from
WEIGHTS = "secure_split.weights"  # on get_attr nodes: the nn.Parameters (not buffers) the constant derives from
PRIVATE_PARAM = "secure_split.private_param"  # on get_attr nodes: matched a SplitConfig.private glob
SOURCE = "secure_split.source"  # on graph inputs: the model argument (or path in one) it is, e.g. "attention_mask"
STAGE = "secure_split.stage"  # stage index, set by the partitioner
CUT = "secure_split.cut"  # on mask/unmask nodes of the boundary graph: the `Cut` they implement

# On a GPU stage lowered to Z_2^64 (`RingLowerPass`), in its GraphModule.meta: per output, its fractional bits,
# the bound of its integer under the declared activation bound, and its shape.
RING_BITS, RING_BOUNDS, RING_SHAPES = "ring_frac_bits", "ring_bounds", "ring_shapes"
