"""A discrete-event simulator that runs the project's own scheduler and router under a step-cost model."""
