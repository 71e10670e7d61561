"""A checkpoint's manifest, and the checks that tell a damaged checkpoint apart.

The manifest (`MANIFEST_NAME`, `perfed_tff_manifest.json`) is written into a
checkpoint folder after its data (`write_manifest`): each file's size and
SHA-256, and a checksum of that list, synced to disk and renamed into place,
so it is whole or absent. `check_files` compares a folder against it ('missing
part: X', 'truncated: X has N of M bytes', 'checksum mismatch: X', an empty
folder, a damaged manifest, an I/O error of the medium); a checkpoint without
one (older code, or a save killed before it) only needs the SavedModel's
parts, TensorFlow's reading checks the rest. A file that cannot be opened
(permissions) is no damage: `CheckpointError`, nothing to set aside. `set_aside` renames a damaged folder `<name>.damaged-<time>`
(`DAMAGED_TAG`): no longer a version, never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Mapping, Optional

class CheckpointError(RuntimeError):
  """A checkpoint cannot be used for this run."""


# Sizes and SHA-256 of a checkpoint's files, written after them (see
# `write_manifest`); checkpoints written before it existed have none.
MANIFEST_NAME = 'perfed_tff_manifest.json'
# An unreadable checkpoint is renamed `<name>.damaged-<time>`: no longer a
# version (TFF parses the part after the prefix as an int), never deleted.
DAMAGED_TAG = '.damaged-'


def _files(path: str) -> list[str]:
  """The files under `path`, relative ('/'-separated), sorted; without the
  manifest (and a manifest write cut short)."""
  out = []
  for root, dirs, names in os.walk(path, onerror=_raise):
    dirs.sort()
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), path).replace(os.sep,
                                                                    '/')
      if rel not in (MANIFEST_NAME, MANIFEST_NAME + '.tmp'):
        out.append(rel)
  return sorted(out)


def _raise(error: OSError):
  raise error


def _sha256(path: str, sync: bool = False) -> tuple[str, int]:
  """(hex SHA-256, size) of the file at `path`; `sync`: fsync it too."""
  digest, size = hashlib.sha256(), 0
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
      size += len(chunk)
    if sync:
      try:
        os.fsync(f.fileno())
      except OSError:
        pass  # A file system without fsync.
  return digest.hexdigest(), size


def _listing_digest(files: Mapping[str, Any]) -> str:
  return hashlib.sha256(
      json.dumps(files, sort_keys=True).encode()).hexdigest()


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_manifest(path: str) -> None:
  """Writes `<path>/MANIFEST_NAME`: the size and SHA-256 of every file of
  the checkpoint folder `path` (and a checksum of that list), after syncing
  them to disk; written to a temporary file and renamed, so it is whole or
  absent."""
  files = {}
  for rel in _files(path):
    digest, size = _sha256(os.path.join(path, rel), sync=True)
    files[rel] = {'bytes': size, 'sha256': digest}
  body = json.dumps({'format': 1, 'files': files,
                     'sha256': _listing_digest(files)}, indent=1,
                    sort_keys=True)
  temp = os.path.join(path, MANIFEST_NAME + '.tmp')
  try:
    with open(temp, 'w') as f:
      f.write(body + '\n')
      f.flush()
      os.fsync(f.fileno())
    os.replace(temp, os.path.join(path, MANIFEST_NAME))
  except BaseException:
    try:
      os.unlink(temp)
    except OSError:
      pass
    raise
  for root, _, _ in os.walk(path):
    _fsync_dir(root)
  _fsync_dir(os.path.dirname(os.path.abspath(path)))


def check_files(path: str) -> Optional[str]:
  """What is wrong with the files of the checkpoint folder `path`, or None.

  With a manifest (`write_manifest`): every file it lists must be there with
  its size and SHA-256 ('missing part: X', 'truncated: X has N of M bytes',
  'checksum mismatch: X', ...). Without one (written by older code, or
  killed before its manifest): the SavedModel's parts must be there;
  TensorFlow's reading checks the rest (its variables carry CRCs).

  Raises:
    CheckpointError: a file or folder cannot be opened
      (permissions): no damage, nothing to set aside.
  """
  if not os.path.isdir(path):
    return 'not a folder'
  manifest_path = os.path.join(path, MANIFEST_NAME)
  try:
    files = _files(path)
    if not files and not os.path.lexists(manifest_path):
      return 'an empty folder'
    if not os.path.lexists(manifest_path):
      for rel in ('saved_model.pb', 'variables/variables.index'):
        if rel not in files:
          return f'missing part: {rel}'
      if not any(f.startswith('variables/variables.data-') for f in files):
        return 'missing part: variables/variables.data-*'
      return None
    try:
      with open(manifest_path, 'rb') as f:
        manifest = json.loads(f.read().decode())
      listed = manifest['files']
      intact = manifest['sha256'] == _listing_digest(listed) and all(
          isinstance(v['bytes'], int) and isinstance(v['sha256'], str)
          for v in listed.values())
    except (ValueError, KeyError, TypeError, AttributeError):
      intact = False
    if not intact:
      return f'its manifest {MANIFEST_NAME} is damaged'
    for rel, want in sorted(listed.items()):
      full = os.path.join(path, *rel.split('/'))
      if not os.path.isfile(full):
        return f'missing part: {rel}'
      size = os.path.getsize(full)
      if size < want['bytes']:
        return f'truncated: {rel} has {size} of {want["bytes"]} bytes'
      if size != want['bytes']:
        return f'size changed: {rel} has {size} bytes, {want["bytes"]} written'
      if _sha256(full)[0] != want['sha256']:
        return f'checksum mismatch: {rel}'
    return None
  except PermissionError as e:
    # The manager's error, which imports this module: imported here.
    raise CheckpointError(
        f'cannot read checkpoint {path} ({e.strerror}: {e.filename}); make '
        'it readable and rerun') from None
  except OSError as e:  # An I/O error of the medium: unreadable.
    return f'cannot be read: {e.strerror or e} ({e.filename})'


def set_aside(path: str) -> str:
  """Renames the damaged checkpoint folder `path` to
  `<path>.damaged-<YYYYmmdd-HHMMSS>` (`-2`, `-3`, ... if taken); returns the
  new path. Nothing is deleted."""
  base = f'{path}{DAMAGED_TAG}{time.strftime("%Y%m%d-%H%M%S")}'
  new, n = base, 1
  while os.path.lexists(new):
    n += 1
    new = f'{base}-{n}'
  os.rename(path, new)
  _fsync_dir(os.path.dirname(os.path.abspath(path)))
  return new
