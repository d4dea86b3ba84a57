"""Keras 3 ``fit()`` callbacks that survive crashes: change one import line.

>>> from ckptmgr.adapters.keras import BackupAndRestore, EarlyStopping, ModelCheckpoint

:class:`ModelCheckpoint`, :class:`BackupAndRestore` and :class:`EarlyStopping` take
the arguments of ``keras.callbacks.ModelCheckpoint``, ``BackupAndRestore`` and
``EarlyStopping`` (same meanings and defaults, same file names and files) and add what
those lack: every file is written atomically and durably through a
:class:`ckptmgr.CheckpointManager`; ``ModelCheckpoint(keep=...)`` keeps only what a
retention policy says and remembers its best across restarts; ``BackupAndRestore``
saves the optimizer, RNG and callback state too and resumes at the exact batch; and
``EarlyStopping`` resumes its patience, best value and best weights.

Differences from ``keras.callbacks`` worth knowing:

- ``ModelCheckpoint``: the directory part of ``filepath`` may not hold placeholders; a
  formatted file name must stay a plain name in that directory; the directory gets the
  engine's hidden files (``.ckptmgr.lock``, ``.ckptmgr-index.json``, one
  ``.ckptmgr-<hash>.json`` sidecar per file) and is locked against a second writer:
  two ckptmgr callbacks (best and last ``ModelCheckpoint``, or one beside
  ``BackupAndRestore``) need a directory each.
  A placeholder with no value raises :class:`FilepathFormatError` (a ``KeyError`` as in
  Keras, and a ``ValueError``).
- ``BackupAndRestore(save_freq=N)`` resumes at the batch of the backup, replaying the
  epoch's earlier batches without their effect, where Keras restarts the epoch and
  trains on them twice; callbacks other than this package's see the replayed batches.
  ``save_freq=False`` never backs up on a schedule. The delete at the end of training
  removes only ckptmgr's files (Keras removes the whole directory).
- A backup holds the state of this package's ``EarlyStopping`` and ``ModelCheckpoint``
  in the same ``fit()`` as they are after the epoch or batch it records, whatever
  their place in the ``callbacks=`` list (``BackupAndRestore`` lets them handle that
  epoch or batch first). Other callbacks (``keras.callbacks.*``, your own) are not
  backed up.
- ``mode="auto"``: as in Keras, ``loss`` is minimised and compiled metrics say their
  direction; other names are inferred from the name (``*acc*`` up, ``*error*`` down,
  see :func:`ckptmgr.metrics.infer_mode`) where Keras raises, and a name that cannot be
  told raises only where the direction is needed.
- Arguments are checked more strictly: ``save_freq`` must be ``"epoch"`` or an int >= 1
  (``BackupAndRestore`` also takes ``False``), where Keras takes any int (and ``True``).
  Where Keras raises too, the message starts with Keras' exact wording
  (``Unrecognized save_freq: ...``, ``Empty `backup_dir` argument passed``, ...), so
  code matching on it keeps working, and ckptmgr's detail follows.
- Improvements are decided by a :class:`ckptmgr.MetricTracker`, the engine's one
  comparator, never by ``keras.ops``: ``ModelCheckpoint(save_best_only=True)`` is the
  manager's ``best_only`` (its :class:`ckptmgr.OnImprovement` policy and tracker decide
  what is saved), and ``EarlyStopping`` has a tracker of its own
  (``EarlyStopping.tracker``: best value, patience count). Values are compared as
  Python floats (float64), where Keras compares in the default float type
  (``float32``): only values within half a float32 step of the best (or of
  ``baseline``/``initial_value_threshold``, or of it plus ``min_delta``) can be decided
  differently. A NaN or infinite value never counts as an improvement (the engine's
  rule, with a :class:`ckptmgr.CheckpointWarning`), where Keras takes a first NaN as
  the best.
- ``monitor_op`` (``EarlyStopping``, ``ModelCheckpoint``) is Keras' ``keras.ops.less`` or
  ``keras.ops.greater``, None until decided; it tells the direction and decides
  nothing. Setting it sets the direction, and only those two (or NumPy's
  ``np.less``/``np.greater``, or None) are accepted. ``min_delta`` stays positive (Keras
  negates it in ``"min"`` mode).
- All three work on Keras' public API (``model.variables``, ``optimizer.variables``,
  ``keras.ops``), with one private attribute Keras' own ``BackupAndRestore`` uses too
  (``model._initial_epoch``), which this one resets when training ends.

For custom training loops, :func:`to_tree` and :func:`load_tree` (from
:mod:`ckptmgr.adapters.tf`) turn models, optimizers and variables into a state tree and
back.
"""

from __future__ import annotations

from ._keras_backup import BackupAndRestore
from ._keras_early_stopping import EarlyStopping
from ._keras_model_checkpoint import FilepathFormatError, ModelCheckpoint
from .tf import load_tree, to_tree

__all__ = [
    "BackupAndRestore",
    "EarlyStopping",
    "FilepathFormatError",
    "ModelCheckpoint",
    "load_tree",
    "to_tree",
]
