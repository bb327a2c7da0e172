"""`diffrl bench objectives` from finished runs: the table, the JSON, the plot and the README's table."""

import json

from omegaconf import OmegaConf

from finetune.bench.objectives import END, RECIPES, START
from finetune.cli import main


def fake_run(folder, objective, model, before, after, guidance=1.0):
    """A finished run: its recipe, history and the results of its first and last evaluations."""
    folder.mkdir(parents=True)
    OmegaConf.save({"objective": {"name": objective}, "model": {"path": model, "guidance_scale": guidance},
                    "eval": {"guidance_scale": None}}, folder / "config.yaml")
    history = []
    for epoch, seconds, correct in ((0, 0.0, before), (5, 300.0, after)):
        rows = [{"filename": f"{i:05d}/samples/{j:04d}.png", "tag": "colors", "metadata": f"p{i}",
                 "correct": correct[i][j]} for i in range(len(correct)) for j in range(len(correct[i]))]
        results = folder / "eval" / f"epoch-{epoch:04d}" / "results.jsonl"
        results.parent.mkdir(parents=True)
        results.write_text("".join(json.dumps(r) + "\n" for r in rows))
        score = sum(map(sum, correct)) / sum(map(len, correct))
        history.append({"epoch": epoch, "time": seconds, "geneval_overall": score, "geneval_overall_se": 0.05})
    (folder / "history.json").write_text(json.dumps(history))


def table_block(page: str) -> str:
    return page[page.index(START):page.index(END)]


def test_report_from_finished_runs_fills_the_readme_table(tmp_path, capsys):
    runs = tmp_path / "board" / "runs"
    fake_run(runs / "ddpo_shapes_sd", "ddpo", "shapes-sd", [[0, 0], [1, 0]], [[1, 1], [1, 0]])
    fake_run(runs / "nft_full_shapes_flow", "nft", "shapes-flow", [[0, 1], [0, 0]], [[0, 1], [0, 1]], guidance=4.0)
    fake_run(runs / "nft_shapes_sd", "nft", "shapes-sd", [[0, 0], [0, 0]], [[1, 1], [0, 0]])  # nft has two recipes
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{START}\nold table\n{END}\nafter\n")
    assert main(["bench", "objectives", "--report", "--objectives", "ddpo", "nft", "--out", str(tmp_path / "board"),
                 "--readme", str(readme)]) == 0
    # ddpo: gains on 2 of 4 images (d = 1, 1 on p0; 0, 0 on p1): var(d) 0 and 0 -> paired s.e. 0.
    table = (tmp_path / "board" / "leaderboard.md").read_text()
    assert "| `ddpo` | shapes-sd | 1 | 5 | 0.250 | 0.750 ± 0.050 | +0.500 ± 0.000 |" in table
    # nft: one image changes (p1: d = 0, 1, var 1/2): s.e. sqrt(2 * 1/2) / 4 = 0.25.
    assert "| `nft` | shapes-flow | 4 | 5 | 0.250 | 0.500 ± 0.050 | +0.250 ± 0.250 |" in table
    page = readme.read_text()
    assert page.startswith("# x\n\nbefore\n" + START) and page.endswith(END + "\nafter\n")
    assert "old table" not in page
    assert "| `ddpo` | Black et al. 2023, DDPO | sd, flow | `shapes-sd`: 0.250 → 0.750, **+0.500 ± 0.000** |" in page
    # one row per objective, its recipes' results joined, sorted by model
    assert ("`shapes-flow`, guidance 4: 0.250 → 0.500, **+0.250 ± 0.250**<br>`shapes-sd`: 0.000 → 0.500, "
            "**+0.500 ± 0.000** |") in page
    assert page.count("not on the leaderboard yet") == 8  # every objective has a row
    entries = json.loads((tmp_path / "board" / "leaderboard.json").read_text())
    assert [len(e["curve"]) for e in entries] == [2, 2, 2]
    assert (tmp_path / "board" / "leaderboard.png").stat().st_size > 0
    # the saved JSON alone rebuilds the same README table (the repository keeps docs/leaderboard.json)
    readme.write_text(f"{START}\n{END}\n")
    assert main(["bench", "objectives", "--from-json", str(tmp_path / "board" / "leaderboard.json"),
                 "--out", str(tmp_path / "again"), "--readme", str(readme)]) == 0
    assert table_block(readme.read_text()) == table_block(page)
    assert (tmp_path / "again" / "leaderboard.md").read_text() == table


def test_bad_input(tmp_path, capsys):
    assert main(["bench", "objectives", "--objectives", "ppo", "--out", str(tmp_path)]) == 2
    assert "--objectives: unknown ['ppo']; the leaderboard has ddpo" in capsys.readouterr().err
    assert main(["bench", "objectives", "--report", "--objectives", "awm", "--out", str(tmp_path)]) == 2
    assert "no finished run in" in capsys.readouterr().err
    assert main(["bench", "objectives", "--objectives", "awm", "--out", str(tmp_path), "train.lrr=1"]) == 2
    assert "train.lrr" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert set(RECIPES) == set(__import__("finetune.objectives", fromlist=["OBJECTIVES"]).OBJECTIVES)
