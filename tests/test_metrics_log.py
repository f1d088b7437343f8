"""The run log: JSONL plus a TensorBoard mirror when a writer is installed."""


def test_metrics_log_flattens_records_for_tensorboard(tmp_path):
    """The TensorBoard mirror gets every number of a record under a readable tag."""
    from mtjax.train import MetricsLog, _scalars

    record = {"loss": 1.5, "task_losses": {"gory": 0.25}, "val": {"per_task": {"gory": {"f1": 0.5}}},
              "finite": 1, "clips": ["a"], "flag": True}
    assert dict(_scalars(record)) == {"loss": 1.5, "task_losses/gory": 0.25, "val/per_task/gory/f1": 0.5,
                                      "finite": 1.0}
    log = MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "tb")
    log.write({"kind": "step", "step": 1, "epoch": 0, **record})
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
