"""``supervised``: the task a job file's ``[data]`` and ``[model]`` describe, with no Python.

    task = make_task("supervised",
                     data={"train": "/data/train.csv", "label": "species", "validation": 0.2},
                     model={"layers": [{"name": "Linear", "args": {"in_features": 4, "out_features": 3}}],
                            "loss": "CrossEntropyLoss"})

Data (reference: docs/data.md): ``train`` (a file, see :mod:`shardstep.workers.tasks.data_files`),
``features`` and ``label`` (columns or arrays), ``dtype`` (float32 or float64, also the
parameters'), ``validation`` (a file with the same columns, or a fraction in (0, 1) of
``train``'s rows held out, chosen by ``split_seed``), ``classes`` (the class names, in
index order, when the labels are names; default: the training labels' sorted distinct
names), ``format``.

Model: ``layers`` and ``loss`` (:mod:`shardstep.workers.nn.spec`); the loss decides what the
labels are: class indices for CrossEntropyLoss and NLLLoss (integers 0..C-1 or class names,
C the last layer's out_features), values of the output's shape for the regression losses,
0/1 values for BCEWithLogitsLoss. Parameters are initialized as
:class:`~shardstep.workers.tasks.models.ModelTask` does, so a job that describes a built-in
task's model and data (digits: examples/jobs/digits-csv.toml) trains bit for bit the same.

Metrics, on the validation data (or on the training data when the job names none):
``loss`` (the criterion's mean) and, for classification, ``accuracy``; for regression,
``rmse``.

The data is read and checked once, by :meth:`prepare`, in the process that starts the run (a
task built again from the same unchanged files takes the arrays already read); it then
travels with the task to every gradient worker (the pickled ``_arrays``), so no other node
needs the files.
With ``ray_data`` (:mod:`shardstep.workers.tasks.ray_rows`), :meth:`prepare` checks only the
columns, :meth:`serve` has Ray Data read the files into row servers once Ray is up, and
:meth:`examples` fetches a worker's rows from them (:meth:`prefetch`: one batch ahead).
"""

from __future__ import annotations

import copy
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstep.checkpoints.layout import ParamSpec
from shardstep.checkpoints.storage import is_url
from shardstep.workers.checks import is_integer
from shardstep.workers.nn import Module
from shardstep.workers.nn.spec import ModelSpec, SpecError
from shardstep.workers.tasks.base import TaskArgumentError, check_dtype
from shardstep.workers.tasks.data_files import FORMATS, DataError, check_schema, file_format, read_columns
from shardstep.workers.tasks.models import NOISE_STREAM, ModelTask
from shardstep.workers.tasks.torch_model import TORCH_MODEL_KEYS, TorchModelSpec

DATA_KEYS = ("train", "validation", "features", "label", "dtype", "split_seed", "classes", "format", "ray_data",
             "row_servers")
MODEL_KEYS = ("layers", "loss", "input_shape")
# the last data a task read in this process, by what it read (SupervisedTask._read_key): the
# job check, a re-check after command-line overrides and the coordinator each build the task,
# and the files are read once; the arrays are shared, never written
_LAST_READ: dict[tuple, SupervisedData] = {}
# the entropy word of the validation split's generator (see base.SHUFFLE_STREAM, models.INIT_STREAM)
SPLIT_STREAM = 4


@dataclass(frozen=True, eq=False)
class SupervisedData:
    """The training and validation arrays, checked against the model."""

    train_inputs: np.ndarray
    train_targets: np.ndarray
    valid_inputs: np.ndarray
    valid_targets: np.ndarray
    validated_on: str  # "validation" or "training" (no validation data given)


def _ray_format(location: str) -> str:
    """The Ray Data reader of a location: its suffix, or data.format for a directory."""
    try:
        kind = file_format(location, None, "data.train")
    except DataError:
        raise TaskArgumentError(f"data.format must be given ('parquet' or 'csv') when Ray Data reads {location!r}, "
                                f"which has no .parquet or .csv suffix") from None
    if kind == "npz":
        raise TaskArgumentError(f"data.ray_data reads Parquet or CSV; {location!r} is an NPZ file")
    return kind


def _names(path: str, value: Any, *, optional: bool) -> str | tuple[str, ...] | None:
    if value is None and optional:
        return None
    if isinstance(value, str) and value:
        return value
    if (isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and value
            and all(isinstance(item, str) and item for item in value)):
        if len(set(value)) != len(value):
            raise TaskArgumentError(f"{path} names a column twice: {list(value)}")
        return tuple(value)
    raise TaskArgumentError(f"{path} must be a column (or array) name or a non-empty list of column names; "
                            f"got {value!r}")


class SupervisedTask(ModelTask):
    """A model from a layer list trained on feature/label data read from files."""

    name = "supervised"
    target_key = "targets"

    def __init__(self, *, data: Mapping[str, Any], model: Mapping[str, Any]):
        if not isinstance(data, Mapping):
            raise TaskArgumentError(f"data must be a table ([data]) of {', '.join(DATA_KEYS)}; got {data!r}")
        if not isinstance(model, Mapping):
            raise TaskArgumentError(f"model must be a table ([model]) of {', '.join(MODEL_KEYS)}; got {model!r}")
        for table, keys, given in (("data", DATA_KEYS, data),
                                   ("model", TORCH_MODEL_KEYS if "module" in model else MODEL_KEYS, model)):
            unknown = [key for key in given if key not in keys]
            if unknown:
                raise TaskArgumentError(f"{table} has unknown key {unknown[0]!r}; allowed: {', '.join(keys)}")
        self._arguments = repr((dict(data), dict(model)))  # what the arrays are a function of, with the files
        if not isinstance(data.get("train"), str) or not data["train"]:
            raise TaskArgumentError(f"data.train is required: the training data file (NPZ, CSV or Parquet; a path "
                                    f"relative to the job file, or a URL); got {data.get('train')!r}")
        self.train = data["train"]
        if "label" not in data:
            raise TaskArgumentError("data.label is required: the label column (or array), or a list of target "
                                    "columns")
        self.label = _names("data.label", data["label"], optional=False)
        self.features = _names("data.features", data.get("features"), optional=True)
        try:
            self.dtype = check_dtype("data.dtype", data.get("dtype", "float32"))
        except ValueError as error:
            raise TaskArgumentError(str(error)) from error
        validation = data.get("validation")
        if isinstance(validation, bool) or not (validation is None or isinstance(validation, (str, numbers.Real))):
            raise TaskArgumentError(f"data.validation must be a data file or a fraction in (0, 1) of the training "
                                    f"rows; got {validation!r}")
        if isinstance(validation, numbers.Real) and not 0.0 < float(validation) < 1.0:
            raise TaskArgumentError(f"data.validation as a fraction of the training rows must be in (0, 1); got "
                                    f"{validation!r}")
        if isinstance(validation, str) and not validation:
            raise TaskArgumentError("data.validation must be a data file or a fraction; got an empty string")
        self.validation = float(validation) if isinstance(validation, numbers.Real) else validation
        split_seed = data.get("split_seed", 0)
        if not is_integer(split_seed) or split_seed < 0:
            raise TaskArgumentError(f"data.split_seed must be an integer >= 0; got {split_seed!r}")
        if "split_seed" in data and not isinstance(self.validation, float):
            raise TaskArgumentError("data.split_seed chooses the rows a validation fraction holds out; it needs "
                                    "data.validation = a fraction")
        self.split_seed = int(split_seed)
        classes = data.get("classes")
        if classes is not None and (isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or not classes
                                    or not all(isinstance(c, str) and c for c in classes)
                                    or len(set(classes)) != len(classes)):
            raise TaskArgumentError(f"data.classes must be a list of distinct class names, in index order; got "
                                    f"{classes!r}")
        self.classes = None if classes is None else tuple(classes)
        self.format = data.get("format")
        if self.format is not None and self.format not in FORMATS:
            raise TaskArgumentError(f"data.format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        self.ray_data = data.get("ray_data", False)
        if not isinstance(self.ray_data, bool):
            raise TaskArgumentError(f"data.ray_data must be true or false; got {self.ray_data!r}")
        row_servers = data.get("row_servers", 1)
        if not is_integer(row_servers) or row_servers < 1:
            raise TaskArgumentError(f"data.row_servers must be an integer >= 1; got {row_servers!r}")
        if "row_servers" in data and not self.ray_data:
            raise TaskArgumentError("data.row_servers is the number of actors that serve the rows Ray Data reads; "
                                    "it needs data.ray_data = true")
        self.row_servers = int(row_servers)
        if self.ray_data:
            if self.format == "npz":
                raise TaskArgumentError("data.ray_data reads Parquet or CSV; data.format is 'npz'")
            self.reader_format = self.format or _ray_format(self.train)
            if isinstance(self.validation, str) and (self.format or _ray_format(self.validation)) != self.reader_format:
                raise TaskArgumentError(f"data.validation ({self.validation}) must be in the format of data.train "
                                        f"({self.reader_format}) when Ray Data reads them")
        try:
            # a layer list in numpy, or a torch module (workers/tasks/torch_model.py)
            self.model = (TorchModelSpec(model) if "module" in model
                          else ModelSpec.parse(model.get("layers"), model.get("loss"), model.get("input_shape")))
        except SpecError as error:
            raise TaskArgumentError(str(error)) from error
        self.torch = isinstance(self.model, TorchModelSpec)
        if self.classes is not None and self.model.loss_kind != "classes":
            raise TaskArgumentError(f"data.classes names classes, but model.loss {self.model.loss[0]} is not a "
                                    f"classification loss")
        if self.model.loss_kind == "classes" and not isinstance(self.label, str):
            raise TaskArgumentError(f"data.label must be one column for {self.model.loss[0]} (the class of each "
                                    f"example); got {list(self.label)}")
        self._arrays: SupervisedData | None = None
        # with ray_data: the row servers' client and the training and validation row ids
        self._rows: Any = None
        self._train_ids: np.ndarray | None = None
        self._valid_ids: np.ndarray | None = None
        self._sizes: dict[str, int] | None = None
        self.prefetches = self.ray_data

    # -- data ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Read and check the data (once; it then travels with the task when pickled). With
        ray_data, only the columns are checked here (the files may be larger than this
        machine); :meth:`serve` reads them on the cluster."""
        if self.ray_data:
            for key in ("data.train", "data.validation"):
                location = getattr(self, key.partition(".")[2])
                if isinstance(location, str):
                    check_schema(location, self.reader_format, features=self.features, label=self.label, key=key)
            return
        if self._arrays is None:
            key = self._read_key()
            if key is not None and key in _LAST_READ:
                self._arrays = _LAST_READ[key]
                return
            self._arrays = self._load()
            _LAST_READ.clear()
            if key is not None:
                _LAST_READ[key] = self._arrays

    def _read_key(self) -> tuple | None:
        """What the data read from: the local files (path, size, modification time, inode)
        and the task's arguments (which shape the arrays); None for a URL (not remembered)."""
        sources = [self.train] + ([self.validation] if isinstance(self.validation, str) else [])
        files = []
        for location in sources:
            if is_url(location):
                return None
            try:
                status = os.stat(location)
            except OSError:
                return None  # the read names what is wrong
            files.append((location, status.st_size, status.st_mtime_ns, status.st_ino))
        return tuple(files), self._arguments

    def serve(self) -> None:
        """With ray_data: read the files with Ray Data into row servers (Ray is up) and
        derive the training and validation row ids; a bad cell fails here, before any shard
        or worker starts."""
        if not self.ray_data or self._rows is not None:
            return
        from shardstep.workers.tasks.ray_rows import serve_rows

        sources = [("data.train", self.train)]
        if isinstance(self.validation, str):
            sources.append(("data.validation", self.validation))
        served = serve_rows(self, sources, self.reader_format, self.row_servers)
        self.cached("served", lambda: served)  # the blocks stay referenced here, never pickled
        self._rows, self._sizes = served.client, served.sizes
        count = served.sizes["data.train"]
        if isinstance(self.validation, float):
            held = self._held_out(count)
            self._train_ids, self._valid_ids = np.flatnonzero(~held), np.flatnonzero(held)
        elif isinstance(self.validation, str):
            self._valid_ids = np.arange(count, count + served.sizes["data.validation"])
        else:
            self._valid_ids = np.arange(count)

    def stop_serving(self) -> None:
        """End the row servers and let go of the blocks (a later run serves again)."""
        if self._rows is None:
            return
        import ray

        for server in self._rows.servers:
            ray.kill(server, no_restart=True)
        self.__dict__.get("_cache", {}).pop("served", None)
        self.__dict__.get("_cache", {}).pop("validation", None)
        self._rows = self._train_ids = self._valid_ids = self._sizes = None

    def _held_out(self, count: int) -> np.ndarray:
        """The rows a validation fraction holds out, as a mask over ``count`` rows."""
        held_count = round(self.validation * count)
        if not 0 < held_count < count:
            raise DataError(f"data.validation = {self.validation} of data.train's {count} rows holds out "
                            f"{held_count}; it must leave at least one row on each side")
        order = np.random.default_rng([self.split_seed, 0, SPLIT_STREAM]).permutation(count)
        held = np.zeros(count, bool)
        held[order[:held_count]] = True
        return held

    def _remote(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._rows is None:
            raise RuntimeError("data.ray_data: the rows are served on the Ray cluster by the coordinator "
                               "(backend 'ray'); this task was not served")
        classes = self.model.loss_kind == "classes"
        return self._rows.fetch(ids, self.model.in_features, self.dtype, () if classes else (self.model.out_features,),
                                np.int64 if classes else self.dtype)

    def _ids(self, positions: np.ndarray) -> np.ndarray:
        return positions if self._train_ids is None else self._train_ids[positions]

    def _data(self) -> SupervisedData:
        self.prepare()
        return self._arrays

    def _load(self) -> SupervisedData:
        train = read_columns(self.train, features=self.features, label=self.label, key="data.train",
                             format=self.format)
        classes = self._classes(train.labels)
        train_inputs = self._inputs(train.features, "data.train")
        train_targets = self._targets(train.labels, classes, "data.train")
        if isinstance(self.validation, str):
            held = read_columns(self.validation, features=self.features, label=self.label, key="data.validation",
                                format=self.format)
            if held.feature_names != train.feature_names:
                raise DataError(f"data.validation ({self.validation}): its feature columns {list(held.feature_names)} "
                                f"differ from data.train's {list(train.feature_names)}")
            if held.features.shape[1:] != train.features.shape[1:]:
                raise DataError(f"data.validation ({self.validation}): features of shape {held.features.shape[1:]} "
                                f"per example; data.train has {train.features.shape[1:]}")
            return SupervisedData(train_inputs, train_targets, self._inputs(held.features, "data.validation"),
                                  self._targets(held.labels, classes, "data.validation"), "validation")
        if isinstance(self.validation, float):
            held = self._held_out(train_inputs.shape[0])
            return SupervisedData(train_inputs[~held], train_targets[~held], train_inputs[held], train_targets[held],
                                  "validation")
        return SupervisedData(train_inputs, train_targets, train_inputs, train_targets, "training")

    def _inputs(self, features: np.ndarray, key: str) -> np.ndarray:
        width = self.model.in_features
        if features.shape[1:] != (width,):
            takes = (f"model.input_shape {list(self.model.input_shape)} takes {width}"
                     if self.torch or len(self.model.input_shape) > 1
                     else f"model.layers' first Linear takes in_features = {width}")
            raise DataError(f"{key} ({getattr(self, key.partition('.')[2])}): {features.shape[1:]} features per "
                            f"example, but {takes}")
        inputs = features.astype(self.dtype)
        if not np.isfinite(inputs).all():  # finite in float64, too large for float32
            row = int(np.argwhere(~np.isfinite(inputs))[0][0]) + 1
            raise DataError(f"{key}: row {row} holds a value beyond the range of {self.dtype} (data.dtype)")
        return inputs

    def _classes(self, labels: np.ndarray) -> tuple[str, ...] | None:
        if self.model.loss_kind != "classes" or labels.dtype.kind != "U":
            return self.classes
        return self.classes or tuple(sorted(set(labels.tolist())))

    def _targets(self, labels: np.ndarray, classes: tuple[str, ...] | None, key: str) -> np.ndarray:
        shown = f"{key} ({getattr(self, key.partition('.')[2])})"
        kind, loss, out = self.model.loss_kind, self.model.loss[0], self.model.out_features
        if kind == "classes":
            if labels.ndim != 1:
                raise DataError(f"{shown}: labels of shape {labels.shape}; {loss} takes one class per example")
            if labels.dtype.kind == "U":
                if classes is None:
                    raise DataError(f"{shown}: label {self.label!r} holds class names ({labels[0]!r}, ...); give "
                                    f"their order in data.classes, or store class indices")
                index = {name: i for i, name in enumerate(classes)}
                unknown = next((name for name in labels.tolist() if name not in index), None)
                if unknown is not None:
                    raise DataError(f"{shown}: label {unknown!r} is not one of the classes "
                                    f"{list(classes)[:12]}")
                labels = np.array([index[name] for name in labels.tolist()], np.int64)
            elif labels.dtype.kind == "f":
                if not np.array_equal(labels, np.round(labels)):
                    row = int(np.argwhere(labels != np.round(labels))[0][0]) + 1
                    raise DataError(f"{shown}: label {self.label!r} holds {labels[row - 1]} at row {row}; {loss} "
                                    f"takes class indices 0..{out - 1} (or class names)")
                labels = labels.astype(np.int64)
            elif classes is not None:
                raise DataError(f"{shown}: data.classes names classes, but label {self.label!r} holds numbers")
            count = len(classes) if classes is not None else out
            if classes is not None and count != out:
                raise DataError(f"{shown}: {count} classes ({list(classes)[:12]}), but model.layers' last Linear "
                                f"has out_features = {out}; they must be equal")
            bad = (labels < 0) | (labels >= out)
            if bad.any():
                row = int(np.argwhere(bad)[0][0]) + 1
                raise DataError(f"{shown}: label {self.label!r} holds class {labels[row - 1]} at row {row}; the "
                                f"model's {out} outputs (last Linear out_features) allow 0..{out - 1}")
            return labels.astype(np.int64)
        if labels.dtype.kind == "U":
            raise DataError(f"{shown}: labels {self.label!r} hold words ({labels.flat[0]!r}, ...); {loss} takes "
                            f"numbers")
        targets = labels.reshape(labels.shape[0], -1).astype(self.dtype)
        if targets.shape[1] != out:
            raise DataError(f"{shown}: {targets.shape[1]} target value(s) per example ({self.label!r}), but "
                            f"model.layers' last Linear has out_features = {out}; they must be equal")
        if kind == "binary" and ((targets < 0) | (targets > 1)).any():
            row = int(np.argwhere((targets < 0) | (targets > 1))[0][0]) + 1
            raise DataError(f"{shown}: {loss} takes targets in [0, 1]; row {row} holds {targets[row - 1].tolist()}")
        return targets

    # -- the task ----------------------------------------------------------------------------

    def without_data(self) -> SupervisedTask:
        bare = copy.copy(self)
        bare.__dict__.pop("_cache", None)
        bare._arrays = None  # init_params builds the model from the layer list alone
        bare._train_ids = bare._valid_ids = None
        return bare

    @property
    def train_size(self) -> int:
        if self.ray_data:
            if self._sizes is None:
                raise RuntimeError("data.ray_data: the number of training rows is known once the rows are served")
            return int(self._sizes["data.train"] if self._train_ids is None else self._train_ids.size)
        return int(self._data().train_inputs.shape[0])

    def examples(self, seed: int, epoch: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        if not self.ray_data:
            return super().examples(seed, epoch, positions)
        inputs, targets = self._remote(self._ids(positions))
        return {self.input_key: inputs, self.target_key: targets}

    def prefetch(self, seed: int, batches: Sequence[tuple[int, np.ndarray]]) -> None:
        if self.ray_data and self._rows is not None:
            self._rows.prefetch([np.asarray(self._ids(positions), np.int64) for _, positions in batches])

    def _validation(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.ray_data:
            data = self._data()
            return data.valid_inputs, data.valid_targets
        return self.cached("validation", lambda: self._remote(self._valid_ids))

    def metric_names(self) -> tuple[str, ...]:
        return ("loss", "rmse") if self.model.loss_kind == "values" else ("accuracy", "loss")

    def module_specs(self) -> tuple[ParamSpec, ...]:
        return self.model.param_specs(self.dtype)

    def build_module(self, rng: np.random.Generator) -> Module:
        return self.model.build(self.dtype, rng)

    def make_criterion(self):
        return self.model.criterion("sum")

    def init_params(self, seed: int) -> dict[str, np.ndarray]:
        if self.torch:
            return self.model.init_params(seed, self.dtype)
        return super().init_params(seed)

    def loss_and_grad(self, params: Mapping[str, np.ndarray], batch: Any):
        if self.torch:
            return self.model.loss_and_grad(params, batch.data[self.input_key], batch.data[self.target_key],
                                            batch.global_size, self.dtype,
                                            (batch.seed, batch.epoch, NOISE_STREAM, batch.index, batch.offset))
        return super().loss_and_grad(params, batch)

    def model_input(self, inputs: np.ndarray) -> np.ndarray:
        # rows of features as the examples' shape (images for Conv2d)
        return inputs.reshape(-1, *self.model.input_shape)

    def forward(self, params: Mapping[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
        if self.torch:
            return self.model.forward(params, inputs, self.dtype)
        return super().forward(params, inputs)

    def training_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        data = self._data()
        return data.train_inputs, data.train_targets

    def evaluate(self, params: Mapping[str, np.ndarray]) -> dict[str, float]:
        inputs, targets = self._validation()
        outputs = self.forward(params, inputs)
        loss = self.model.criterion("mean")(outputs, targets)
        kind = self.model.loss_kind
        if kind == "classes":
            return {"accuracy": float(np.mean(outputs.argmax(axis=1) == targets)), "loss": float(loss)}
        if kind == "binary":
            return {"accuracy": float(np.mean((outputs > 0) == (targets > 0.5))), "loss": float(loss)}
        error = outputs.astype(np.float64) - targets
        return {"loss": float(loss), "rmse": float(np.sqrt(np.mean(error * error)))}
