"""The report on hand-written run folders: the numbers in its tables, the reference column, its figures."""

import json

import matplotlib.image
import pytest

from conftest import FIGURE_PIXELS, NFNET, VIT, markdown_tables, write_run
from trainer.report import main as report_main

def report(tmp_path, *runs):
    assert report_main([str(r) for r in runs] + ["--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    results, reference, *_ = markdown_tables(text)
    return text, {r["run"]: r for r in results}, {r["run"].split("[^")[0]: r for r in reference}


def test_results_table_reads_back_the_metrics(tmp_path):
    run = write_run(tmp_path / "runs" / "mine", acc1=(50.0, 70.5, 65.25))
    _, results, _ = report(tmp_path, run)
    row = results["mine"]
    assert row["model (timm)"] == NFNET and row["optimizer"] == "adamw" and row["scheduler"] == "cosine"
    assert row["epochs done / planned"] == "3 / 25"
    assert row["final train loss"] == "1.0000"  # 3.0 / epoch 3
    assert row["final top-1 (%)"] == "65.25"
    assert row["best top-1 (%) (epoch)"] == "70.50 (2)"
    assert row["final top-5 (%)"] == "85.25"
    assert row["wall time (h:mm:ss)"] == "0:10:00"  # 100 + 200 + 300 s
    assert row["images/s (mean)"] == "2,000"
    assert row["hardware"] == "NVIDIA H200" and row["processes / global batch"] == "8 / 256"


def test_reference_values_only_where_the_settings_match(tmp_path):
    runs = tmp_path / "runs"
    match = write_run(runs / "a", acc1=[60.0] * 25)  # found by its settings: NFNet, adamw, cosine
    # Given by its timm name, not the preset's: the same model.
    vit = write_run(runs / "vit_adamw_cosine", model=VIT, timm_model=VIT, acc1=[70.0] * 25)
    other_lr = write_run(runs / "b", learning_rate=1e-3, acc1=[60.0] * 25)
    unfinished = write_run(runs / "nfnet_sgdm_cosine", optimizer="sgdm", acc1=(40.0, 50.0))
    tiny = write_run(runs / "c", model="test_vit", timm_model="test_vit")
    # The reference settings on other data (--data): the study file's results are CIFAR-100's, so none is shown.
    pets = write_run(runs / "d", data="imagefolder:/data/pets", acc1=[60.0] * 25)
    text, _, reference = report(tmp_path, match, vit, other_lr, unfinished, tiny, pets)

    assert reference["a"]["reference experiment"] == "nfnet_adamw_cosine"
    assert (reference["a"]["reference train loss"], reference["a"]["reference top-1 (%)"]) == ("1.6041", "74.23")
    assert reference["a"]["final top-1 (%)"] == "60.00" and reference["a"]["final train loss"] == "0.1200"
    assert reference["vit_adamw_cosine"]["reference top-1 (%)"] == "73.17"
    assert reference["b"]["reference top-1 (%)"].startswith("-[^")
    assert "learning_rate 0.001 (reference 0.0005)" in text
    # An unfinished run with the reference settings shows the reference, with a note that it is not final.
    assert reference["nfnet_sgdm_cosine"]["reference top-1 (%)"] == "58.47"
    assert "unfinished: 2 of 25 epochs" in text
    assert reference["c"]["reference experiment"] == "-" and reference["c"]["reference top-1 (%)"].startswith("-[^")
    assert "no experiment of study.yaml uses test_vit, adamw, cosine" in text
    assert reference["d"]["reference top-1 (%)"].startswith("-[^")
    assert "d: settings differ from the reference nfnet_adamw_cosine: data imagefolder:/data/pets (reference " \
           "cifar100)" in text


def test_figures_per_run_and_per_comparison_present(tmp_path):
    runs = tmp_path / "runs"
    nfnet = write_run(runs / "nfnet_adamw_cosine")
    vit = write_run(runs / "vit_adamw_cosine", model="vit", timm_model=VIT, steps=False)  # plotted from metrics
    linear = write_run(runs / "nfnet_adamw_linear_decay", scheduler="linear_decay", acc1=(55.0,))
    text, *_ = report(tmp_path, nfnet, vit, linear)
    out = tmp_path / "out"
    expected = ["nfnet_adamw_cosine.png", "vit_adamw_cosine.png", "nfnet_adamw_linear_decay.png",
                "compare_cnn_vs_vit.png", "compare_cosine_vs_linear_decay.png"]
    for name in expected:
        assert matplotlib.image.imread(out / name).shape[:2] == FIGURE_PIXELS, name
        assert f"]({name})" in text
    assert not (out / "compare_adamw_vs_sgdm.png").exists()  # no SGDM run


def write_evaluation(run, accuracies):
    """An evaluation/ folder as trainer.evaluate writes it: metrics.json, per_class.csv (10 images per class),
    confusion.png (a small image here: the report copies it, it does not draw it)."""
    folder = run / "evaluation"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"source": str(run / "epoch_2"), "ema": False, "val_loss": 1.5,
                                                     "val_acc1": 61.25, "val_acc5": 85.5, "val_images": 100}))
    rows = ["class,name,superclass,superclass_name,images,correct,accuracy"] + \
        [f"{c},class{c},0,aquatic_mammals,10,{a // 10},{a:.2f}" for c, a in enumerate(accuracies)]
    (folder / "per_class.csv").write_text("\n".join(rows) + "\n")
    matplotlib.image.imsave(folder / "confusion.png", [[0.0, 1.0], [1.0, 0.0]])
    return folder


def test_evaluation_of_the_final_checkpoint_when_present(tmp_path):
    runs = tmp_path / "runs"
    evaluated = write_run(runs / "nfnet_adamw_cosine", acc1=(50.0, 60.0))
    write_evaluation(evaluated, [90, 30, 70, 10, 100, 30, 50, 0, 80, 60])
    bare = write_run(runs / "vit_adamw_cosine", model="vit", timm_model=VIT)  # no evaluation/: no section for it
    text, *_ = report(tmp_path, evaluated, bare)
    section = text.split("## Per-class evaluation of the final checkpoint")[1]
    assert ("**nfnet_adamw_cosine** (`epoch_2`): top-1 61.25 %, top-5 85.50 %, loss 1.5000 on 100 test images."
            in section)
    # The 5 lowest, lowest first; ties in class order.
    assert ("Lowest classes: class7 0.00 % (0/10), class3 10.00 % (1/10), class1 30.00 % (3/10), "
            "class5 30.00 % (3/10), class6 50.00 % (5/10).") in section
    assert "](nfnet_adamw_cosine_confusion.png)" in section and "vit_adamw_cosine" not in section
    copied = tmp_path / "out" / "nfnet_adamw_cosine_confusion.png"
    assert copied.read_bytes() == (evaluated / "evaluation" / "confusion.png").read_bytes()
    # Without any evaluation the report has no such section.
    text, *_ = report(tmp_path / "bare", bare)
    assert "Per-class evaluation" not in text


def test_runs_with_the_same_folder_name_from_two_machines(tmp_path):
    a = write_run(tmp_path / "machine_a" / "nfnet_adamw_cosine", hardware="NVIDIA H100")
    b = write_run(tmp_path / "machine_b" / "nfnet_adamw_cosine", hardware="CPU (x86_64, 2 cores)")
    _, results, _ = report(tmp_path, a, b)
    assert results["machine_a_nfnet_adamw_cosine"]["hardware"] == "NVIDIA H100"
    assert results["machine_b_nfnet_adamw_cosine"]["hardware"] == "CPU (x86_64, 2 cores)"
    assert (tmp_path / "out" / "machine_b_nfnet_adamw_cosine.png").is_file()


def test_partial_last_line_of_a_killed_run_is_skipped_and_default_out(tmp_path):
    run = write_run(tmp_path / "runs" / "mine", acc1=(50.0, 70.5))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "step": 1')
    assert report_main([str(run)]) == 0
    results = markdown_tables((tmp_path / "runs" / "report" / "report.md").read_text())[0]
    assert results[0]["epochs done / planned"] == "2 / 25"


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: None, lambda p: write_run(p).joinpath(
    "metrics.jsonl").write_text("")], ids=["no-metrics", "missing", "empty-metrics"])
def test_a_folder_that_is_not_a_run_is_one_line_and_exit_2(tmp_path, capsys, make):
    folder = tmp_path / "x"
    make(folder)
    assert report_main([str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(folder) in err


def test_runs_whose_folder_and_parent_names_repeat_keep_their_own_rows_and_figures(tmp_path):
    a = write_run(tmp_path / "machine_a" / "runs" / "nfnet_adamw_cosine", acc1=(50.0, 60.0))
    b = write_run(tmp_path / "machine_b" / "runs" / "nfnet_adamw_cosine", acc1=(50.0, 70.0))
    text, results, _ = report(tmp_path, a, b)
    assert {name: row["final top-1 (%)"] for name, row in results.items()} == {
        "runs_nfnet_adamw_cosine_1": "60.00", "runs_nfnet_adamw_cosine_2": "70.00"}
    for name in results:  # one figure each, none drawn over another
        assert (tmp_path / "out" / f"{name}.png").is_file() and f"]({name}.png)" in text


def test_figure_links_with_spaces_stay_markdown_links(tmp_path):
    run = write_run(tmp_path / "runs" / "my run (2)")
    text, *_ = report(tmp_path, run)
    # CommonMark: a bare destination ends at a space; percent-encoded, the link is whole and names the file.
    assert "![my run (2): " in text and "](my%20run%20%282%29.png)" in text
    assert (tmp_path / "out" / "my run (2).png").is_file()


def write_predictions(run, rows: str):
    (run / "evaluation").mkdir()
    (run / "evaluation" / "predictions.csv").write_text("image,label,prediction\n" + rows)


@pytest.mark.parametrize("rows, message", [
    ("0,3,3\n1,4\n", "is damaged"),
    ("0,3,3\n2,4,4\n", "one row per image in order"),
])
def test_a_damaged_predictions_file_is_one_line_naming_it(tmp_path, capsys, rows, message):
    a = write_run(tmp_path / "nfnet_adamw_cosine", epochs=2)
    b = write_run(tmp_path / "vit_adamw_cosine", model="vit", timm_model=VIT, epochs=2)
    write_predictions(a, "0,3,3\n1,4,4\n")
    write_predictions(b, rows)
    assert report_main([str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {b / 'evaluation' / 'predictions.csv'} is damaged") and message in line, line


def test_runs_evaluated_on_other_images_are_not_compared_and_unfinished_ones_are_not_counted(tmp_path):
    a = write_run(tmp_path / "nfnet_adamw_cosine", epochs=2)  # 2 metrics lines: finished
    b = write_run(tmp_path / "vit_adamw_cosine", model="vit", timm_model=VIT, epochs=2)
    c = write_run(tmp_path / "nfnet_sgdm_cosine", optimizer="sgdm")  # 2 of 25 epochs
    write_predictions(a, "0,3,3\n1,4,4\n")
    write_predictions(b, "0,3,3\n1,5,4\n")
    text, _, _ = report(tmp_path, a, b, c)
    (row,) = [r for r in markdown_tables(text)[-1] if r.get("B") == "vit_adamw_cosine"]
    assert row["verdict"] == "not evaluated on the same test images"
    assert [r["experiment"] for r in markdown_tables(text)[-2]] == ["nfnet_adamw_cosine", "vit_adamw_cosine"]
    assert "Not counted, unfinished: nfnet_sgdm_cosine." in text
