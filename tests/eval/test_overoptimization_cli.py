"""`mmalign eval overoptimization` end to end on a tiny pipeline: outputs, the wiring of the curves to the
per-sample scores, ensembles standardised over all samples, and bad input as one line with status 2."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from mmalign.cli import main


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_overoptimization_command_end_to_end(tmp_path, tiny_sd_factory, capsys):
    tiny_sd_factory(seed=0).save_pretrained(tmp_path / "pipe")
    ensemble = {"name": "ensemble", "mode": "uwo", "lam": 0.5,
                "members": ["jpeg_compressibility", "jpeg_incompressibility"]}
    out = tmp_path / "out"
    code = main(["eval", "overoptimization", "--pipeline", str(tmp_path / "pipe"), "--n", "3", "--prompt-seed", "2",
                 "--samples-per-prompt", "4", "--steps", "2", "--batch-size", "5", "--gold", "gold",
                 "--proxy", "a=jpeg_compressibility", "--proxy", "b=jpeg_incompressibility",
                 "--proxy", f"ens={json.dumps(ensemble)}", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "gold of the best-of-n pick" in printed and "overoptimization.png" in printed
    for name in ("overoptimization.png", "overoptimization.csv", "overoptimization.json", "scores.csv"):
        assert (out / name).is_file(), name
    samples = _read_csv(out / "scores.csv")
    assert len(samples) == 12 and {"gold", "a", "b", "ens"} <= set(samples[0])
    a, b, ens, gold = (np.array([float(r[k]) for r in samples]) for k in ("a", "b", "ens", "gold"))
    # the ensemble: each member standardised by the mean and population std of all 12 samples, then UWO
    z = np.stack([(x - x.mean()) / x.std() for x in (a, b)])
    assert ens == pytest.approx(z.mean(0) - 0.5 * z.var(0), abs=1e-4)
    # the curve at n = N is the gold of each prompt's top sample by the proxy (batches of 5 cut across prompts)
    rows = {(r["proxy"], int(r["n"])): r for r in _read_csv(out / "overoptimization.csv")}
    assert {n for _, n in rows} == {1, 2, 4} and {p for p, _ in rows} == {"a", "b", "ens", "gold picks"}
    assert rows[("ens", 4)]["baseline"] == "a" and rows[("a", 4)]["baseline"] == ""  # paired with the first proxy
    top = [gold.reshape(3, 4)[p, a.reshape(3, 4)[p].argmax()] for p in range(3)]
    assert float(rows[("a", 4)]["gold_mean"]) == pytest.approx(np.mean(top), abs=1e-5)
    assert float(rows[("a", 1)]["gold_mean"]) == pytest.approx(gold.mean(), abs=1e-5)
    assert float(rows[("a", 2)]["kl"]) == pytest.approx(np.log(2) - 0.5, abs=1e-6)
    result = json.loads((out / "overoptimization.json").read_text())
    assert result["sampler"]["num_steps"] == 2 and result["recipe"]["samples_per_prompt"] == 4
    assert result["curves"]["gold picks"]["peak"]["n"] == 4
    ens_agreement = result["agreement"]["ens"]
    assert len(ens_agreement["members"]) == 2 and -1 <= ens_agreement["member_correlation"] <= 1
    member_a = ens_agreement["members"][0]["pairwise_accuracy"]  # the ensemble's first member is proxy a
    assert member_a == pytest.approx(result["agreement"]["a"]["pairwise_accuracy"])


@pytest.mark.parametrize(("argv", "message"), [
    (["--samples-per-prompt", "1"], "--samples-per-prompt"),
    (["--proxy", "gold picks=jpeg_compressibility"], "gold picks"),
    (["--proxy", "jpeg_compressibility", "--run", "x"], "give exactly one of --run"),
    (["--proxy", "{bad json"], "--proxy: expected a reward name or a JSON object"),
])
def test_overoptimization_bad_input_is_one_line(argv, message, capsys):
    base = ["eval", "overoptimization", "--pipeline", "world", "--gold", "gold", "--n", "2"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
