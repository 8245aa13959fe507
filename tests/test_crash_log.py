"""The CLI boundary: a bug (not a user error) is one stderr line naming a crash log that holds the traceback."""
import re

from raypress import cli


def test_unexpected_failure_is_one_line_and_a_crash_log(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RAYPRESS_CACHE", str(tmp_path / "cache"))

    def broken(args):
        return {}["no such key"]  # a KeyError: the kind of bug users must report, not fix

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), broken))
    rc = cli.main(["ui", "--port", "5000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("raypress: error: unexpected KeyError"), err
    log = re.search(r"full traceback in (\S+);", err[0]).group(1)
    assert log.startswith(str(tmp_path / "cache" / "logs"))
    text = open(log).read()
    assert "Traceback" in text and "in broken" in text and "argv: ['ui', '--port', '5000']" in text


def test_crash_log_falls_back_to_the_temp_folder_when_the_cache_is_unwritable(tmp_path):
    from raypress.errors import write_crash_log

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    try:
        raise ValueError("boom")
    except ValueError as e:
        path = write_crash_log(e, blocker / "logs", argv=[])
    assert not path.startswith(str(blocker)) and "ValueError: boom" in open(path).read()


def _with_func(parser, func):
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser
