"""Reproductions of the SSJF, Multi-Bin batching and SARATHI papers on binserve (``binserve bench report``)."""
