"""metrics.jsonl: appended locally, and on an object store uploaded whole but rarely."""

from gpt_jax import metrics


class FakeRemotePath:
    """An object-store path that counts its uploads."""

    def __init__(self):
        self.text, self.uploads = "", 0

    def __str__(self) -> str:
        return "gs://bucket/run/metrics.jsonl"

    def exists(self) -> bool:
        return bool(self.text)

    def read_text(self) -> str:
        return self.text

    def write_text(self, text: str) -> None:
        self.text, self.uploads = text, self.uploads + 1


def test_a_remote_metrics_file_is_not_uploaded_per_line(monkeypatch):
    path = FakeRemotePath()
    out = metrics._AppendFile(path)
    for i in range(100):
        out.write(f'{{"step": {i}}}\n')
        out.flush()
    assert path.uploads == 0  # within UPLOAD_SECONDS of opening
    monkeypatch.setattr(metrics._AppendFile, "UPLOAD_SECONDS", 0.0)
    out.write('{"step": 100}\n')
    out.flush()
    assert path.uploads == 1 and path.text.count("\n") == 101
    out.flush()
    assert path.uploads == 1  # nothing new: nothing sent
    out.write('{"step": 101}\n')
    out.close()
    assert path.uploads == 2 and path.text.endswith('{"step": 101}\n')


def test_a_local_metrics_file_is_appended_line_by_line(tmp_path):
    from etils import epath

    out = metrics._AppendFile(epath.Path(tmp_path / "metrics.jsonl"))
    out.write('{"step": 1}\n')
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'  # line-buffered
    out.close()
