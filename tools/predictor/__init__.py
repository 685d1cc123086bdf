"""Training and evaluating the SSJF length predictor (the runtime half lives in ``cluster.predictor``)."""
