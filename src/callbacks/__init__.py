"""Every Lightning callback of the project (and the TensorBoard logger they write through).

* :mod:`src.callbacks.anchor_coverage`: a WARNING at fit start when the anchors cover under 90%
  of the training boxes (``python -m src.inspect`` shows them and suggests anchor sizes).
* :mod:`src.callbacks.console`: the progress bar, the start summary and the end-of-run summary.
* :mod:`src.callbacks.ema`: an exponential moving average of the weights (``callbacks=ema``).
* :mod:`src.callbacks.faults`: random states in checkpoints, a checkpoint on SIGTERM/SIGINT.
* :mod:`src.callbacks.hparams`: TensorBoard's HParams and Text tabs, the run-named logger.
* :mod:`src.callbacks.pictures`: anchor panels, detection grids and PR curves in TensorBoard.
* :mod:`src.callbacks.pruning`: Optuna pruning.
* :mod:`src.callbacks.results`: COCO results files of the validation and test detections.
"""
