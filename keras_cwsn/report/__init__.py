"""Results of finished runs as Markdown tables beside the paper's Table 3, and PNG figures of their curves.

- `tables`: runs grouped into rows; mean ± std and best over seeds, the paper, the `ce` baseline.
- `histories`: the runs' per-epoch CSV histories, a figure's curve and its best epoch.
- `plots`: the curves as PNG figures (matplotlib).
- `cli`: `python -m keras_cwsn.report`, which prints the tables or writes them into a Markdown file
  between markers.

Nothing here loads Keras or TensorFlow.
"""
