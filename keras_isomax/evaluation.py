"""One call from a trained model and data sets to an OOD detection table.

`evaluate_ood(model, in_data, ood_data)` runs the model once over the
in-distribution data and once over each OOD set, scores the logits with any
score of `keras_isomax.scores`, and returns an `OODEvaluation`: a list of rows
(one per model, score and OOD set) with the classification accuracy and the
exact detection metrics of `keras_isomax.detection_metrics.ood_metrics`. Print it for a
table; pass a dict of models to compare an IsoMax+ and a SoftMax head in one
call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from keras_isomax import _checks, _runner, report
from keras_isomax import detection_metrics as metrics_lib
from keras_isomax import scores as scores_lib
from keras_isomax._typing import Data, ScoreFunction, Verbose
from keras_isomax.detectors import Detector
from keras_isomax.report import ROW_KEYS

__all__ = ["ROW_KEYS", "OODEvaluation", "evaluate_ood"]


class OODEvaluation(Sequence):
    """The result of `evaluate_ood`: rows of metrics plus the raw scores.

    A read-only sequence of dict rows with the keys `ROW_KEYS`: `model`,
    `score`, `ood` (the OOD set's name), `accuracy` (in-distribution accuracy,
    NaN without labels), the six metrics of `ood_metrics` (fractions in
    `[0, 1]`), `n_in` and `n_ood`. `str(result)` is a fixed-width table in
    percent; `to_markdown()` gives the same as Markdown.

    Attributes:
        rows: The list of row dicts.
        accuracy: Dict model name -> in-distribution accuracy.
    """

    def __init__(
        self,
        rows: Iterable[dict[str, Any]],
        scores: Mapping[tuple[str, str], tuple[np.ndarray, Mapping[str, np.ndarray]]],
        accuracy: Mapping[str, float],
    ) -> None:
        self.rows = list(rows)
        self.accuracy = dict(accuracy)
        self._scores = scores

    def __getitem__(self, index: Any) -> Any:
        return self.rows[index]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"OODEvaluation({len(self.rows)} rows)"

    def __str__(self) -> str:
        return self.to_string()

    @property
    def model_names(self) -> list[str]:
        """Names of the evaluated models, in order."""
        return list(dict.fromkeys(key[0] for key in self._scores))

    @property
    def score_names(self) -> list[str]:
        """Names of the evaluated scores, in order."""
        return list(dict.fromkeys(key[1] for key in self._scores))

    def scores(
        self, model: str | None = None, score: str | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The raw scores of one model and score, e.g. for the plots.

        Args:
            model: Model name. Defaults to `None` (the only or first model).
            score: Score name. Defaults to `None` (the model's first score).

        Returns:
            `(in_scores, ood_scores)`: a 1-D NumPy array and a dict OOD set
            name -> 1-D NumPy array.

        Raises:
            KeyError: If no scores exist for that model and score.
        """
        for (model_name, score_name), value in self._scores.items():
            if (model is None or model == model_name) and (score is None or score == score_name):
                return value[0], dict(value[1])
        raise KeyError(
            f"No scores for model={model!r}, score={score!r}; available: {list(self._scores)}"
        )

    def filter(self, **criteria: Any) -> list[dict[str, Any]]:
        """Rows whose values equal all the given `key=value` criteria."""
        return [row for row in self.rows if all(row.get(k) == v for k, v in criteria.items())]

    def to_string(self, columns: Sequence[str] | None = None, digits: int = 2) -> str:
        """A fixed-width text table, metrics in percent.

        Args:
            columns: Keys to show. Defaults to `None` (all but
                `tnr_at_tpr`, `fpr_at_tpr` and `fpr_at_tpr95`).
            digits: Decimals of the percentages. Defaults to `2`.

        Returns:
            The table as a string.
        """
        return report.to_string(self.rows, columns, digits)

    def to_markdown(self, columns: Sequence[str] | None = None, digits: int = 2) -> str:
        """The table of `to_string` (same arguments) as GitHub Markdown."""
        return report.to_markdown(self.rows, columns, digits)

    def plot_score_histograms(
        self,
        path: str | os.PathLike,
        model: str | None = None,
        score: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Writes a PNG of score histograms; see `plots.plot_score_histograms`."""
        kwargs.setdefault("score_name", score or self._first_score(model))
        return self._plot("plot_score_histograms", path, model, score, kwargs)

    def plot_roc(
        self,
        path: str | os.PathLike,
        model: str | None = None,
        score: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Writes a PNG of ROC curves; see `plots.plot_roc`."""
        kwargs.setdefault("title", f"ROC, {score or self._first_score(model)} score")
        return self._plot("plot_roc", path, model, score, kwargs)

    def _plot(
        self, plot: str, path: str | os.PathLike, model: str | None, score: str | None, kwargs: dict
    ) -> str:
        """Calls `plots.<plot>` on the scores of `model` and `score`."""
        from keras_isomax import plots

        in_scores, ood_scores = self.scores(model, score)
        return getattr(plots, plot)(in_scores, ood_scores, path, **kwargs)

    def _first_score(self, model: str | None) -> str:
        for model_name, score_name in self._scores:
            if model is None or model == model_name:
                return score_name
        return "score"


def _score_list(score: Any, arg_name: str = "score") -> list[tuple[str, Any]]:
    items = [score] if isinstance(score, str) or callable(score) else score
    if not isinstance(items, Sequence) or isinstance(items, str) or not items:
        raise ValueError(
            "`score` must be a score name, a callable or a non-empty list of them. "
            f"Received: {arg_name}={score!r}"
        )
    return [
        (s.name, s)
        if isinstance(s, Detector)
        else (scores_lib.name_of(scores_lib.get(s)), scores_lib.get(s))
        for s in items
    ]


def evaluate_ood(
    model: keras.Model | Mapping[str, keras.Model],
    in_data: Data,
    ood_data: Mapping[str, Data],
    score: str
    | ScoreFunction
    | Detector
    | Sequence[str | ScoreFunction | Detector]
    | Mapping[str, Any] = "minimum_distance",
    *,
    batch_size: int = 256,
    tpr: float = 0.95,
    verbose: Verbose = "auto",
) -> OODEvaluation:
    """Evaluates OOD detection of one or more models on named OOD sets.

    Each model runs once over `in_data` and once over each OOD set (once more
    per distinct feature layer when feature detectors are scored). Scores see
    the classifier's pre-softmax logits: the `IsoMaxPlusLayer`'s output (also
    when, say, a `Softmax` follows it), or, for a SoftMax classifier, the
    output of its final `Dense` before the softmax, so a SoftMax baseline is
    evaluated with `score=["max_probability", "max_logit", "energy"]` whether
    or not the model applies the softmax itself. The same logits feed the
    logit detectors (`detectors.Energy()` and `score="energy"` agree).

    Labels are read in the same pass as the inputs, so a shuffling dataset is
    fine. In-distribution is the positive class of the metrics (see
    `keras_isomax.detection_metrics.ood_metrics`).

    Args:
        model: A Keras model, or a dict name -> model to compare several
            (e.g. `{"softmax": m1, "isomax+": m2}`).
        in_data: In-distribution test data: a tuple `(x, y)` of arrays, or a
            batched `tf.data.Dataset` yielding `(x, y)`; `x` alone (or a dataset
            of `x`) also works, with accuracy reported as NaN.
        ood_data: Dict name -> OOD data (arrays, `(x, ...)` tuples or batched
            datasets; labels are ignored).
        score: A score name of `keras_isomax.scores`, a callable
            `logits -> scores`, a fitted `keras_isomax.detectors.Detector`
            (rows named after `detector.name`), a list of them, or (with a dict of models) a
            dict model name -> any of those. Defaults to `"minimum_distance"`.
        batch_size: Batch size for arrays. Defaults to `256`.
        tpr: True positive rate of the `tnr_at_tpr`/`fpr_at_tpr` columns
            (and of their aliases `tnr_at_tpr95`/`fpr_at_tpr95`).
            Defaults to `0.95`.
        verbose: `"auto"`, 0, 1 or 2, as in `keras.Model.predict` (one
            stage per model and data set). Defaults to `"auto"`.

    Returns:
        An `OODEvaluation` (print it, iterate its dict rows, or get its raw
        scores for `plot_score_histograms`/`plot_roc`).

    Raises:
        TypeError: If `ood_data` is not a dict, or `model` is not a model or
            dict of models.
        ValueError: If a data set is empty, a score is unknown, or the scores
            hold NaN (the message names the model, score and data set).

    Example:

    >>> import numpy as np, keras
    >>> from keras_isomax import IsoMaxPlusLayer
    >>> from keras_isomax.evaluation import evaluate_ood
    >>> model = keras.Sequential([keras.Input((4,)), IsoMaxPlusLayer(3)])
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(200, 4)).astype("float32"), rng.integers(0, 3, 200)
    >>> noise = rng.uniform(size=(100, 4)).astype("float32")
    >>> result = evaluate_ood(model, (x, y), {"noise": noise}, verbose=0)
    >>> sorted(result[0])[:3]
    ['accuracy', 'aupr_in', 'aupr_out']
    """
    models = _model_dict(model)
    if not isinstance(ood_data, Mapping) or not ood_data:
        raise TypeError(
            "`ood_data` must be a non-empty dict name -> OOD data set. "
            f"Received: ood_data={type(ood_data).__name__}"
        )
    if isinstance(score, Mapping):
        missing = [name for name in models if name not in score]
        if missing:
            raise ValueError(
                f"`score` is a dict but has no entry for models {missing}. "
                f"Received: score keys {list(score)}"
            )
        score_lists = {name: _score_list(score[name]) for name in models}
    else:
        shared = _score_list(score)
        score_lists = {name: shared for name in models}

    batch_size = _checks.check_int(batch_size, "batch_size")
    data_sets = {"in_data": in_data}
    data_sets.update({f"ood_data[{name!r}]": data for name, data in ood_data.items()})
    names = dict(zip(data_sets, ["in_data", *ood_data], strict=True))
    rows, raw_scores, accuracy = [], {}, {}
    for model_name, net in models.items():
        runner = _runner.runner_for(net)
        runs = {
            arg: runner.collect(
                data,
                batch_size=batch_size,
                arg_name=arg,
                with_labels=arg == "in_data",
                label_classes=runner.num_classes,
                verbose=verbose,
                stage=f"evaluate_ood: {model_name}, {names[arg]}",
            )
            for arg, data in data_sets.items()
        }
        logits, labels = runs["in_data"].logits, runs["in_data"].labels
        if labels is None:
            acc = math.nan
        else:
            _check_labels(labels, logits.shape[-1], model_name)
            acc = float(np.mean(np.argmax(logits, axis=-1) == labels))
        accuracy[model_name] = acc
        feature_runs: dict[Any, dict[str, Any]] = {}
        for score_name, score_fn in score_lists[model_name]:
            if isinstance(score_fn, Detector):
                values = _detector_scores(
                    score_fn, net, data_sets, runs, feature_runs, batch_size, verbose, model_name
                )
            else:
                # A NaN/Inf input scores NaN whatever the backbone does with it;
                # ood_metrics then names the data set.
                values = {arg: _score_values(score_fn, run) for arg, run in runs.items()}
            in_scores = values.pop("in_data")
            ood_scores = {names[arg]: value for arg, value in values.items()}
            raw_scores[(model_name, score_name)] = (in_scores, ood_scores)
            for ood_name, out_scores in ood_scores.items():
                try:
                    metric_values = metrics_lib.ood_metrics(in_scores, out_scores, tpr=tpr)
                except ValueError as error:
                    raise ValueError(
                        f"Model {model_name!r}, score {score_name!r}, OOD set {ood_name!r}: {error}"
                    ) from error
                rows.append(
                    {
                        "model": model_name,
                        "score": score_name,
                        "ood": ood_name,
                        "accuracy": acc,
                        **metric_values,
                        "n_in": int(in_scores.shape[0]),
                        "n_ood": int(out_scores.shape[0]),
                    }
                )
    return OODEvaluation(rows, raw_scores, accuracy)


def _model_dict(model: Any) -> dict[str, Any]:
    if isinstance(model, keras.Model | keras.layers.Layer):
        return {model.name: model}
    if isinstance(model, Mapping) and model:
        bad = [k for k, v in model.items() if not isinstance(v, keras.layers.Layer)]
        if not bad:
            return {str(k): v for k, v in model.items()}
        raise TypeError(
            f"Every value of the `model` dict must be a Keras model; {bad} are not. "
            f"Received: model={model!r}"
        )
    raise TypeError(
        "`model` must be a Keras model or a non-empty dict name -> model. "
        f"Received: model={type(model).__name__}"
    )


def _detector_scores(
    detector: Detector,
    net: keras.Model,
    data_sets: Mapping[str, Data],
    runs: Mapping[str, _runner.Batch],
    feature_runs: dict[Any, dict[str, Any]],
    batch_size: int,
    verbose: Verbose,
    name: str,
) -> dict[str, np.ndarray]:
    """A detector's scores on every data set; feature passes shared by detectors that
    read the same features."""
    detector.attach(net)  # Checks it was fitted on this model (or its feature width).
    if detector.input_kind == "logits":
        return {
            arg: detector.score_features(
                np.where(run.nonfinite[:, None], np.nan, run.logits), verbose=0
            )
            for arg, run in runs.items()
        }
    key = detector.features
    if key not in feature_runs:
        runner = _runner.runner_for(net, key, need_features=True)
        feature_runs[key] = {
            arg: runner.collect(
                data,
                batch_size=batch_size,
                arg_name=arg,
                verbose=verbose,
                stage=f"evaluate_ood: {name}, features of {arg}",
            ).features
            for arg, data in data_sets.items()
        }
    return {
        arg: detector.score_features(feats, verbose=0) for arg, feats in feature_runs[key].items()
    }


def _score_values(score_fn: ScoreFunction, run: _runner.Batch) -> np.ndarray:
    values = np.asarray(keras.ops.convert_to_numpy(score_fn(run.logits)))
    values = values.reshape(-1).astype(np.float64)
    if values.shape != run.nonfinite.shape:
        raise ValueError(
            f"A score must map logits (N, C) to one value per example, shape "
            f"({len(run.nonfinite)},). Received: score output of shape {values.shape}"
        )
    return np.where(run.nonfinite, np.nan, values)


def _check_labels(labels: np.ndarray, num_classes: int, model_name: str) -> None:
    """Labels must be class ids of the model's classes (one-hot width checked too)."""
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(
            f"The labels of `in_data` must be class ids in [0, {num_classes}) for model "
            f"{model_name!r} ({num_classes} classes); {int(bad.sum())} of {labels.size} "
            f"are not. Received: labels {np.unique(labels[bad])[:5].tolist()}"
        )
