"""The scheduler: the one decider. Turns commands into facts, owns the queue and GPU placement."""
