r"""Writes TFF's `shakespeare.sqlite` from a plays text, one client per speaker.

  python -m experiments.make_shakespeare \
      --text=../shared/data/tinyshakespeare.txt --cache_dir=/tmp/tff_cache
  python -m experiments.train --dataset=shakespeare --cache_dir=/tmp/tff_cache

The rule (speeches, clients, the train/test split) and the client ids are
those of `perfed_tff.data.shakespeare_plays`. Prints one summary line. A bad
text (missing, empty, not UTF-8 text, no speech, fewer than 2 clients) or a
cache directory where the file cannot be written gets one line on stderr and
exit status 2, and nothing is written (no file, no partial file, no new
directory); 130 when interrupted (143 SIGTERM, 129 SIGHUP), also with nothing
written. An existing `shakespeare.sqlite` there is replaced as a whole.
"""


if __name__ == '__main__':  # Not when imported (tests, notebooks).
  from experiments import startup  # pylint: disable=g-import-not-at-top
  startup.begin()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from experiments import cli
from perfed_tff.data import shakespeare_plays as plays
from perfed_tff.program import interrupts

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The binary's flags (defined when it runs, not on import, so the module
  can be imported beside the training binaries' --cache_dir)."""
  flags.DEFINE_string(
      'text', None, 'The plays text (UTF-8): speeches headed by a line '
      '`NAME:`, separated by blank lines (e.g. tinyshakespeare.txt).')
  flags.DEFINE_string(
      'cache_dir', None, 'Directory to write shakespeare.sqlite in (created '
      'when missing); pass it as --cache_dir of experiments.train.')
  flags.mark_flags_as_required(['text', 'cache_dir'])


def format_summary(splits, path: str) -> str:
  clients, train, test = plays.summary(splits)
  return (f'{clients} clients, {train + test} snippets ({train} train, {test} '
          f'test): {path}')


def main(argv):
  del argv
  # A signal raises: the write removes what it made (startup's handler
  # would exit at once and could leave a partial file).
  interrupts.start()
  try:
    text_path = FLAGS.text
    text = plays.read_text(text_path)
    try:
      splits = plays.client_data_from_text(text)
    except plays.PlaysTextError as e:
      cli.fail(f'--text: {text_path}: {e}')
    path = plays.write_shakespeare_sqlite(splits, FLAGS.cache_dir)
  except plays.PlaysTextError as e:
    cli.fail(f'--text: {e}')
  except plays.CacheDirError as e:
    cli.fail(f'--cache_dir: {e}')
  except KeyboardInterrupt as e:
    what, status = cli.stopped(e)
    cli.fail(f'{what}; nothing was written', status)
  print(format_summary(splits, path), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
