"""Reports and figures of runs (nothing heavy is imported here; matplotlib loads on first plot).

* :mod:`sats.report.runs`: a run's ``results.json`` as a :class:`~sats.report.runs.RunResult`.
* :mod:`sats.report.tables`: old / new / all tables across runs (markdown, CSV), paper side-by-side.
* :mod:`sats.report.plots`: mIoU-per-step curves and per-class IoU heat maps (PNG).
* :mod:`sats.report.summary`: ``sats report`` (every table and figure into one folder).
* :mod:`sats.report.visualize`: ``sats visualize``: image / ground truth / prediction after each step.
* :mod:`sats.report.tsne`: ``sats visualize --tsne``: decoder features per class (openTSNE, optional).
* :mod:`sats.report.paper_results`: published numbers (the SATS paper, the DKD and STAR READMEs), as data.
"""
