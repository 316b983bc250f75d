"""torch.fx passes: capture/lowering, taint, labelling, mask insertion, leak audit."""
