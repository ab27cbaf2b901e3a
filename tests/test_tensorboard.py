"""What TensorBoard reads from a real sweep's event files: the HParams experiment with the swept
key first and flagged as differing, and the custom-scalars chart of target vs other-digit error."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalars
from tensorboard.plugins.hparams import metadata as hparams

from conftest import SLICE, train_py


def accumulators(run_dir) -> list[EventAccumulator]:
    loaded = []
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        loaded.append(acc)
    return loaded


def hparams_content(run_dir) -> dict[str, bytes]:
    """Tag -> HParams plugin data, over all of the run's event files."""
    content = {}
    for acc in accumulators(run_dir):
        try:
            content |= acc.PluginTagToContent(hparams.PLUGIN_NAME)
        except KeyError:  # this file holds no HParams data
            pass
    return content


def custom_scalars_layout(run_dir) -> layout_pb2.Layout:
    for acc in accumulators(run_dir):
        if custom_scalars.CONFIG_SUMMARY_TAG in acc.Tags()["tensors"]:
            tensor = acc.Tensors(custom_scalars.CONFIG_SUMMARY_TAG)[0].tensor_proto
            return layout_pb2.Layout.FromString(tensor.string_val[0])
    raise AssertionError(f"{run_dir} has no custom scalars layout")


def test_sweep_shows_swept_key_first_and_forgetting_chart(tmp_path, pretrained):
    done = train_py("stage=finetune", "lora.rank=1,2", f"base={pretrained[1]}", *SLICE, "trainer.max_steps=3",
                    "trainer.val_check_interval=3", f"output_root={tmp_path}", "-m")
    assert done.returncode == 0, done.stderr
    jobs = sorted(p for p in tmp_path.glob("finetune-sweep/*/*") if p.is_dir())
    assert [job.name[:2] for job in jobs] == ["0_", "1_"]
    for rank, job in zip((1, 2), jobs):
        content = hparams_content(job)
        experiment = hparams.parse_experiment_plugin_data(content[hparams.EXPERIMENT_TAG])
        infos = experiment.hparam_infos
        # TensorBoard shows the differing hparams first; the rest, all the same here, after.
        assert infos[0].name == "lora.rank" and infos[0].differs
        assert not any(info.differs for info in infos[1:])
        assert {"optim.lr", "data.batch_size", "lora.alpha"} <= {info.name for info in infos}
        assert [m.name.tag for m in experiment.metric_infos][:2] == ["hp/test_acc", "hp/target_wrong"]
        session = hparams.parse_session_start_info_plugin_data(content[hparams.SESSION_START_INFO_TAG])
        assert session.hparams["lora.rank"].number_value == rank
        charts = [chart for category in custom_scalars_layout(job).category for chart in category.chart]
        assert [list(chart.multiline.tag) for chart in charts] == [["val/err_target", "val/err_other"]]


def test_single_run_flags_no_hparam_as_differing(finetuned):
    experiment = hparams.parse_experiment_plugin_data(hparams_content(finetuned[1])[hparams.EXPERIMENT_TAG])
    assert experiment.hparam_infos[0].name == "stage" and not any(info.differs for info in experiment.hparam_infos)
    assert custom_scalars_layout(finetuned[1]).category[0].title == "forgetting"
