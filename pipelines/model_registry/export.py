"""`vitae export`, owned here: a registered or logged model written back as a checkpoint in the
reference layout (`{"model": state_dict}`, the reference implementation's key names), which
`vitae.load_pretrained`, `model.pretrained` and the reference code read; to a file or an `s3://` object."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import tempfile
from pathlib import Path

import torch

import vitae
from infra.errors import UserError
from infra.object_store import Upload, is_s3_url, parse_s3_url, shared_store
from pipelines.model_registry.evaluation import load_model
from pipelines.tracking.client import TrackingServer, answering


def reference_checkpoint_bytes(model_uri: str, server: TrackingServer | None = None) -> bytes:
    """The logged model `model_uri` (of `server`, default the environment's) as the bytes of a
    reference-layout checkpoint (the same bytes for the same weights)."""
    packaged, _ = load_model(model_uri, torch.device("cpu"), server)
    buffer = io.BytesIO()
    torch.save(vitae.pretrained.reference_checkpoint(packaged.model), buffer)
    return buffer.getvalue()


def check_destination(out: str) -> None:
    """`UserError` unless `out` names a file in an existing directory or bucket (checked before the
    model is downloaded)."""
    if is_s3_url(out):
        location = parse_s3_url(out)
        if not location.key or location.key.endswith("/"):
            raise UserError(f"--out {out}: expected s3://BUCKET/KEY, a file name")
        shared_store(location.bucket).check_bucket()
    elif not Path(out).expanduser().parent.is_dir():
        raise UserError(f"--out {out}: no directory {Path(out).expanduser().parent}")


def write_file(data: bytes, out: str) -> None:
    """`data` to the file or `s3://` object `out` (see `check_destination`), whole or not at all."""
    if is_s3_url(out):
        location = parse_s3_url(out)
        store = shared_store(location.bucket)
        with tempfile.NamedTemporaryFile(prefix="vitae-export-") as staged:
            staged.write(data)
            staged.flush()
            store.upload_files([Upload(staged.name, location.key, {"sha256": hashlib.sha256(data).hexdigest()})])
        return
    path = Path(out).expanduser()
    staged = None
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as staged:
            staged.write(data)
        os.replace(staged.name, path)
    except OSError as error:
        if staged is not None:
            Path(staged.name).unlink(missing_ok=True)
        raise UserError(f"--out {out}: cannot write ({error.strerror or error})") from None


def export_command(args: argparse.Namespace) -> int:
    check_destination(args.out)
    with answering(f"exporting {args.model}"):
        data = reference_checkpoint_bytes(args.model)
    write_file(data, args.out)
    keys = len(vitae.pretrained.unwrap_state_dict(vitae.pretrained.read_checkpoint(io.BytesIO(data))))
    print(f"wrote {args.out}: {keys} tensors in the reference layout, {len(data) / 2**20:.1f} MiB, "
          f"sha256 {hashlib.sha256(data).hexdigest()}")
    return 0
