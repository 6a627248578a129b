"""Merged pieces: stages ``first..last`` (one skip variant each) plus exit head ``last`` as ONE artifact.

When the runtime will not stop at exits ``first..last-1`` it can run one graph for the span instead
of the chain of per-stage pieces: no dead exit heads, one session call. For ``first == 0`` and
``last == S-1`` the merged piece is the whole network of that skip config (the monolithic model).

``add_merged_pieces(bundle_dir, spans)`` builds them into an existing bundle (portable or device):

1. composes the portable ONNX files (``onnx``/``portable`` artifacts) of the span's chained pieces
   (segment k of a skip config whose char k is ``variant[k - first]``) into one graph with
   ``onnx.compose.merge_models`` (tensors connected by name, ``features{k}`` -> ``features{k}``),
   keeping only the final outputs (``features{last}`` unless ``last`` is the last stage, and
   ``logits``); the intermediate exits' heads become dead and are pruned; ``onnx.checker`` checks
   the result;
2. a parity gate: the merged graph against the chain, both with ONNX Runtime (CPU, 1 thread), on
   ``inputs`` (default: seeded random normal, batch 4): max |diff| of the logits and of the
   features beyond ``atol`` raises :class:`export.errors.ExportError` naming the piece;
3. for every (backend, target) the chained pieces have artifacts for, the backend's artifact made
   the way ``export/compile.py`` makes one (the backend's ``compile_piece`` with the bundle's
   device profile; ``onnxruntime`` without a loadable profile re-uses the stage artifacts'
   options). A backend that cannot be compiled here (``check_profile`` says no, e.g. TVM not
   installed) is skipped, as ``compile`` skips it, with a progress note: the runtime then runs
   the chain for that backend. TensorRT gets the ONNX plus its engine build plan (engines are
   built on the device by ``pipeline engines``). Artifacts that run here are checked against the
   merged portable ONNX (same ``atol``).

Files are written into a staging directory next to the bundle, moved in when the span is
complete, and ``manifest.json`` is then rewritten atomically (validated), one span at a time.
Spans already present are skipped (idempotent). Uses onnx, onnxruntime and numpy, never torch.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from export.errors import CompileError, ExportError
from export.manifest_builder import add_artifact_file, add_piece
from runtime.backends import PORTABLE
from runtime.bundle import Bundle
from runtime.errors import UsageError
from runtime.manifest import (LOGITS, MANIFEST_NAME, MERGED, Manifest, Piece, TensorSpec,
                              merged_piece_id, save_manifest)

__all__ = ["add_merged_pieces", "span_chain", "span_prefixes", "compose_onnx", "merged_piece_id"]

Progress = Callable[[str], None]
Span = tuple[int, int, str]
DEFAULT_BATCH = 4
PORTABLE_TARGET = "portable"


def span_chain(m: Manifest, first: int, last: int, variant: str,
               prefix: Optional[str] = None) -> list[Piece]:
    """The pieces the runtime chains for stages ``first..last`` under ``variant`` on the path
    ``prefix`` (variants of stages 0..first-1; None: any path): segment k of a skip config
    that follows the path (``Manifest.span_configs``)."""
    try:
        configs = m.span_configs(first, last, variant, prefix)
    except KeyError as exc:
        raise UsageError(f"span {first}..{last} variant {variant!r}: {exc.args[0]}") from None
    return [p for k, cfg in enumerate(configs, start=first) for p in m.segments(cfg)[k]]


def span_prefixes(m: Manifest, first: int, last: int, variant: str) -> list[Optional[str]]:
    """The paths before ``first`` a merged piece of this span needs one version for: [None]
    (one piece serves every path) unless the bundle's pieces are specific to their path
    (``Piece.prefix``), then every prefix some skip config reaches the span through."""
    if not m.per_path or first == 0:
        return [None]
    return sorted({c[:first] for c in m.skip_configs if c[first:last + 1] == variant})


def _check_span(m: Manifest, span: object) -> Span:
    try:
        first, last, variant = span  # type: ignore[misc]
    except (TypeError, ValueError):
        raise UsageError(f"span {span!r}: expected (first, last, variant)") from None
    S = m.stages
    if not (isinstance(first, int) and isinstance(last, int) and 0 <= first < last < S):
        raise UsageError(f"span {span!r}: expected 0 <= first < last <= {S - 1} (a merged piece "
                         "spans at least two stages)")
    if (not isinstance(variant, str) or len(variant) != last - first + 1
            or set(variant) - {"T", "F"}):
        raise UsageError(f"span {span!r}: variant must be {last - first + 1} chars 'T'/'F', one "
                         f"per stage {first}..{last}")
    return first, last, variant


# ---------------------------------------------------------------------------------------------
# composing the ONNX graphs
# ---------------------------------------------------------------------------------------------

def _prune(model):
    """Drop nodes (and initializers) that no graph output depends on."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # names a subgraph reads from the outer scope
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    needed.update(i for n in sub.node for i in n.input if i)
    keep.reverse()
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    if len(inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in needed]
    if len(vis) != len(g.value_info):
        del g.value_info[:]
        g.value_info.extend(vis)
    return model


def _keep_outputs(model, names: list[str]):
    """``model`` with only the graph outputs ``names`` (in that order), dead nodes pruned."""
    import onnx

    by_name = {o.name: o for o in model.graph.output}
    if [o.name for o in model.graph.output] == names:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend([by_name[n] for n in names])
    return _prune(m)


def compose_onnx(models: list[tuple[Piece, Any]], final_outputs: list[str]
                 ) -> tuple[Any, list[str]]:
    """One ONNX model computing ``final_outputs`` from the chain ``models`` ((piece, ModelProto)
    in run order, tensors passed by name as the runtime passes them).

    Returns (model, ids of chain pieces that were entirely dead and dropped). Outputs a later
    piece does not read (the intermediate exits' logits) are removed before merging, so their
    heads are pruned.
    """
    import onnx
    from onnx import compose

    n = len(models)
    keep: list[list[str]] = []
    for i, (piece, _m) in enumerate(models):
        names = []
        for t in piece.outputs:
            later_reader = None
            overwritten = False
            for j in range(i + 1, n):
                pj = models[j][0]
                if any(x.name == t.name for x in pj.inputs):
                    later_reader = j
                    break
                if any(x.name == t.name for x in pj.outputs):
                    overwritten = True
                    break
            last_writer = not any(x.name == t.name for pj, _ in models[i + 1:] for x in pj.outputs)
            if later_reader is not None or (t.name in final_outputs and last_writer
                                            and not overwritten):
                names.append(t.name)
        keep.append(names)
    dropped = [p.id for (p, _m), k in zip(models, keep) if not k]
    parts = []
    for i, ((piece, m), names) in enumerate(zip(models, keep)):
        if not names:
            continue
        m = _keep_outputs(m, names)
        m = compose.add_prefix(m, f"p{i}_", rename_inputs=False, rename_outputs=False)
        parts.append(m)
    if not parts:
        raise ExportError("nothing of the chain computes the requested outputs")
    merged = parts[0]
    produced = [o.name for o in merged.graph.output]
    for j, m in enumerate(parts[1:], start=1):
        ins = [i.name for i in m.graph.input]
        io_map = [(x, x) for x in ins if x in produced]
        later_in = {i.name for p in parts[j + 1:] for i in p.graph.input}
        m_out = [o.name for o in m.graph.output]
        outputs = [x for x in produced if (x in later_in or x in final_outputs)
                   and x not in m_out] + m_out
        merged = compose.merge_models(merged, m, io_map=io_map, outputs=outputs)
        produced = [o.name for o in merged.graph.output]
    missing = [x for x in final_outputs if x not in produced]
    if missing:
        raise ExportError(f"the composed graph lacks the outputs {missing}")
    merged = _keep_outputs(merged, list(final_outputs))
    merged = _prune(merged)
    onnx.checker.check_model(merged)
    return merged, dropped


# ---------------------------------------------------------------------------------------------
# running (ONNX Runtime, CPU, one thread)
# ---------------------------------------------------------------------------------------------

def _session(source: Union[str, bytes]):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(source, sess_options=so, providers=["CPUExecutionProvider"])


def _run_chain(root: Path, chain: list[Piece], env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    env = dict(env)
    for p in chain:
        sess = _session(str(root / p.find_artifacts(PORTABLE, PORTABLE_TARGET)[0].file))
        outs = sess.run(None, {t.name: env[t.name] for t in p.inputs})
        env.update(zip([o.name for o in sess.get_outputs()], outs))
    return env


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _gate(pid: str, what: str, got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray],
          names: list[str], atol: float) -> float:
    worst = 0.0
    for name in names:
        d = _max_diff(got[name], ref[name])
        if not (d == d and d <= atol):
            raise ExportError(f"merged piece {pid!r}: {what}: max |diff| of {name!r} = {d:.3g} > "
                              f"tolerance {atol:g}")
        worst = max(worst, d)
    return worst


def _span_input(spec: TensorSpec, inputs, pid: str) -> np.ndarray:
    x = None
    if isinstance(inputs, Mapping):
        x = inputs.get(spec.name)
    elif inputs is not None:
        x = inputs
    if x is None:
        shape = [DEFAULT_BATCH if d in ("N", -1) else int(d) for d in spec.shape]
        return np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    want = [d for d in spec.shape]
    if x.ndim != len(want) or any(d not in ("N", -1) and d != s for d, s in zip(want, x.shape)):
        raise UsageError(f"merged piece {pid!r}: inputs for {spec.name!r} have shape "
                         f"{list(x.shape)}, the piece reads {want}")
    return x


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------

def _load_profile(m: Manifest):
    if not m.device:
        return None
    try:
        from devices import load_profile
        return load_profile(m.device)
    except Exception:  # noqa: BLE001 - an unknown or invalid profile: compile what needs none
        return None


def _compile(profile, backend: str, target: str, stage_art, onnx_path: Path, onnx_rel: str,
             stage: Path, pid: str) -> Optional[tuple[str, dict, str]]:
    """(relpath, options, note) of ``backend``'s artifact of the merged ONNX under ``stage``,
    or None with the reason when it cannot be made here."""
    from export.backends import BackendUnavailable, export_module

    if profile is None or profile.backend(backend) is None:
        if backend == "onnxruntime":  # the stage artifacts' options say how they were saved
            from export.onnxruntime_backend import optimize_onnx

            rel = f"onnxruntime/{target}/{pid}.onnx"
            opts = optimize_onnx(onnx_path, stage / rel, stage_art.options)
            return rel, opts, f"saved at level '{opts['saved_optimization_level']}'"
        raise BackendUnavailable("the bundle's device profile "
                                 f"({profile.name if profile else 'none'}) cannot be loaded here "
                                 f"or has no {backend} backend")
    module = export_module(backend)
    module.check_profile(profile)
    try:
        return module.compile_piece(profile, onnx_path, stage, pid, onnx_rel=onnx_rel,
                                    target=target, tune_trials=0, tuning_db_dir=None)
    except BackendUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - backends raise many types
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise CompileError(f"{backend} compile of merged piece {pid!r} failed: {why}") from exc


def _verify(profile, backend: str, path: Path, options: dict, x: np.ndarray, input_name: str,
            ref: Mapping[str, np.ndarray], names: list[str], pid: str, atol: float) -> Optional[float]:
    from export.backends import export_module
    from runtime.backends import open_runner, runner_options

    if backend == "tensorrt":
        return None
    if backend != "onnxruntime" and (profile is None
                                     or not export_module(backend).can_verify_here(profile)):
        return None
    opts = runner_options(backend, options, strict=False)
    if backend == "onnxruntime":
        opts.update(providers=["CPUExecutionProvider"], intra_op_threads=1)
    r = open_runner(backend, path, opts, input_names=[input_name], output_names=names)
    got = dict(zip(r.output_names, r.run({input_name: x})))
    return _gate(pid, f"{backend} artifact vs the merged ONNX", got, ref, names, atol)


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------

def add_merged_pieces(bundle_dir: Union[str, os.PathLike], spans: Iterable[Span], *,
                      inputs: Union[None, np.ndarray, Mapping[str, np.ndarray]] = None,
                      atol: float = 1e-4, progress: Optional[Progress] = None) -> list[str]:
    """Add a merged piece (kind ``"merged"``, id ``stages{first}-{last}.{variant}``) for every
    ``(first, last, variant)`` of ``spans`` to the bundle at ``bundle_dir``; return the new ids.
    In a bundle whose pieces are specific to their path, a span after stage 0 gets one merged
    piece per path before it (``stages1-2.TF.F``, ``stages1-2.TF.T``: :func:`span_prefixes`).

    ``inputs``: float32 input batches for the parity gate: one array (used for every span), or
    a mapping tensor name (``x``, ``features0``, ...) -> array; default (or a name missing from
    the mapping): seeded random normal of the span input's shape, batch 4. A span whose merged
    piece exists already is skipped. Raises :class:`ExportError` naming the piece when the merged
    graph (or a compiled artifact of it) differs from the chain by more than ``atol``.

    ``macs`` / ``params`` of a merged piece: the sum over the chained pieces, minus the pieces
    that become entirely dead (the intermediate ``head{k}`` pieces of a ``split`` bundle, whose
    cost the manifest records). A ``stage`` piece's head is part of the piece's own count and not
    recorded separately, so for ``stage`` bundles the dropped heads stay counted: the numbers are
    then an upper bound (by the intermediate heads' MACs/params, small next to the stages).
    """
    import onnx

    progress = progress or (lambda _m: None)
    root = Path(bundle_dir)
    bundle = Bundle.open(root)
    m = bundle.manifest.copy()
    todo: list[Span] = []
    for span in spans:
        s = _check_span(m, span)
        if s not in todo:
            todo.append(s)
    profile = None
    profile_loaded = False
    new_ids: list[str] = []
    for first, last, variant, prefix in [(f, l, v, p) for f, l, v in todo
                                         for p in span_prefixes(m, f, l, v)]:
        pid = merged_piece_id(first, last, variant, prefix)
        if any(p.id == pid for p in m.pieces):
            progress(f"merged  {pid}: already in the bundle")
            continue
        chain = span_chain(m, first, last, variant, prefix)
        for p in chain:
            if not p.find_artifacts(PORTABLE, PORTABLE_TARGET):
                raise UsageError(f"{bundle.manifest_path}: piece {p.id!r} has no portable ONNX "
                                 f"artifact; merged piece {pid!r} is composed from those")
        final = ([f"features{last}"] if last < m.stages - 1 else []) + [LOGITS]
        models = [(p, onnx.load(str(root / p.find_artifacts(PORTABLE, PORTABLE_TARGET)[0].file)))
                  for p in chain]
        try:
            merged, dropped = compose_onnx(models, final)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnx raises ValueError, ValidationError...
            why = " ".join(str(exc).split()) or type(exc).__name__
            raise ExportError(f"merged piece {pid!r}: composing {' > '.join(p.id for p in chain)} "
                              f"failed: {why}") from exc
        in_spec = TensorSpec(chain[0].inputs[0].name, list(chain[0].inputs[0].shape),
                             chain[0].inputs[0].dtype)
        last_out = {t.name: t for p in chain for t in p.outputs}  # the last writer's spec
        out_specs = [TensorSpec(n, list(last_out[n].shape), last_out[n].dtype) for n in final]

        # parity: merged vs chain, ONNX Runtime on the portable files
        x = _span_input(in_spec, inputs, pid)
        data = merged.SerializeToString()
        sess = _session(data)
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {in_spec.name: x})))
        ref = _run_chain(root, chain, {in_spec.name: x})
        worst = _gate(pid, f"merged vs chain {' > '.join(p.id for p in chain)}", got, ref,
                      final, atol)
        progress(f"merged  {pid:<24} {len(chain)} pieces -> 1 graph ({len(merged.graph.node)} "
                 f"nodes); max |diff| vs chain {worst:.1e}")

        # the (backend, target) pairs every chained piece has
        pairs: Optional[list[tuple[str, str]]] = None
        for p in chain:
            have = [(a.backend, a.target) for a in p.artifacts if a.backend != PORTABLE]
            pairs = have if pairs is None else [bt for bt in pairs if bt in have]
        stage_dir = Path(tempfile.mkdtemp(prefix=".merge-", dir=root.parent))
        try:
            onnx_rel = f"onnx/{pid}.onnx"
            (stage_dir / onnx_rel).parent.mkdir(parents=True, exist_ok=True)
            (stage_dir / onnx_rel).write_bytes(data)
            made: list[tuple[str, str, str, dict]] = [
                (PORTABLE, PORTABLE_TARGET, onnx_rel,
                 {**chain[0].find_artifacts(PORTABLE, PORTABLE_TARGET)[0].options,
                  "merged_from": [p.id for p in chain]})]
            for backend, target in pairs or []:
                if not profile_loaded:
                    profile, profile_loaded = _load_profile(m), True
                stage_art = chain[0].find_artifacts(backend, target)[0]
                from export.backends import BackendUnavailable
                try:
                    res = _compile(profile, backend, target, stage_art, stage_dir / onnx_rel,
                                   onnx_rel, stage_dir, pid)
                except BackendUnavailable as exc:
                    progress(f"skip    {backend}/{target} for {pid}: {exc} (the runtime chains "
                             "the stage pieces there)")
                    continue
                rel, opts, note = res
                d = _verify(profile, backend, stage_dir / rel, opts, x, in_spec.name, got, final,
                            pid, atol)
                made.append((backend, target, rel, opts))
                progress(f"{backend:<11} {pid:<24} {target}  {note}"
                         + ("" if d is None else f"; max |diff| vs merged ONNX {d:.1e}"))
            # move the files in, then the manifest
            for path in sorted(stage_dir.rglob("*")):
                if path.is_file():
                    dst = root / path.relative_to(stage_dir)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, dst)
        finally:
            shutil.rmtree(stage_dir, ignore_errors=True)
        by_id = {p.id: p for p in chain}
        piece = Piece(id=pid, kind=MERGED, stage=last, first_stage=first, variant=variant,
                      prefix=prefix, skip=None, returns_logits=True, inputs=[in_spec], outputs=out_specs,
                      macs=sum(p.macs for p in chain) - sum(by_id[d].macs for d in dropped),
                      params=sum(p.params for p in chain) - sum(by_id[d].params for d in dropped))
        add_piece(m, piece)
        for backend, target, rel, opts in made:
            add_artifact_file(m, root, pid, rel, backend=backend, target=target, options=opts)
        save_manifest(m, root / MANIFEST_NAME)
        new_ids.append(pid)
    return new_ids
