"""A model over a folder of labelled DICOM, through the daemon's own path, with honest uncertainty.

``edge-agent validate`` scores every instance listed in a labels CSV exactly as the daemon would, and reports
sensitivity and specificity at the card's threshold and ROC AUC, each with a bootstrap 95% confidence
interval, overall and per subgroup, as report.json, report.md and roc.png; with ``--drift-reference`` it
also writes the model's drift reference into its card.

- ``stats``: the statistics (pure; the training recipe uses them too)
- ``labels``: the labels CSV and the subgroups
- ``run``: the model over the data (``validate``)
- ``report``: the report and its Markdown, JSON and plot; ``plots``: the ROC picture
"""
