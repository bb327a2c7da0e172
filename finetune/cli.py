"""The ``diffrl`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_shapes_prompts(args) -> None:
    from eval.shapes import grammar

    records = grammar.split(args.split, seed=args.seed)
    grammar.write_jsonl(records, args.out)
    print(f"wrote {len(records)} {args.split} prompts to {args.out}")


def cmd_shapes_render(args) -> None:
    from tqdm.auto import tqdm

    from eval.layout import write_prompt
    from eval.shapes.grammar import read_jsonl
    from eval.shapes.render import render

    records = read_jsonl(args.metadata)
    for i, record in enumerate(tqdm(records, desc="rendering")):
        images = [render(record, seed=args.seed * 1_000_003 + i * 1_000 + j)[0]
                  for j in range(args.images_per_prompt)]
        write_prompt(args.out, i, record, images)
    print(f"rendered {len(records) * args.images_per_prompt} images to {args.out}")


def cmd_shapes_dataset(args) -> None:
    from finetune.expert import shapes_dataset

    dataset = shapes_dataset(args.split, args.images_per_prompt, args.seed)
    if args.format == "parquet":
        Path(args.out).mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(Path(args.out) / f"{args.split}.parquet"))
    else:
        dataset.save_to_disk(args.out)
    print(f"wrote {len(dataset)} (prompt, image, tag) rows of the {args.split} split to {args.out} "
          f"(use it as data.expert={args.out})")


def cmd_eval_geneval(args) -> None:
    from eval import geneval
    from eval.report import category_grids
    from eval.run import default_metadata, geneval_model

    if (args.images is None) == (args.model is None):
        raise ValueError("give --images DIR (score an existing folder) or --model NAME (generate, then score)")
    if args.images:
        backend = geneval.get_backend(args.backend or "shapes")
        rows = geneval.score_folder(args.images, backend)
        summary = geneval.write_results(rows, args.out)
        category_grids(args.images, rows, Path(args.out).parent / "grids")
    else:
        summary = geneval_model(args.model, args.out, args.lora, args.metadata, args.backend, args.images_per_prompt,
                                args.seed, args.batch_size, args.steps, args.guidance, args.noise_policy,
                                args.condition)
        if summary is None:  # not the main process
            return
        print(f"metadata: {args.metadata or default_metadata(args.model)}; images, results.jsonl, grid.png and grids/ (one per task) in {args.out}")
    print(geneval.format_summary(summary))


def cmd_eval_reward(args) -> None:
    from eval.run import compare_table, reward_model

    rewards = [r.strip() for r in args.reward.split(",") if r.strip()]
    tuned = [x for x in (args.lora, args.noise_policy) if x is not None]
    runs = {}  # name -> (lora, noise policy)
    if args.compare or not tuned:
        runs[args.model] = (None, None)
    if tuned:
        runs[" + ".join([args.model, *tuned])] = (args.lora, args.noise_policy)
    results = {}
    for name, (lora, noise_policy) in runs.items():
        stats = reward_model(args.model, rewards, args.prompts, lora, args.images_per_prompt, args.seed,
                             args.batch_size, args.steps, args.guidance, noise_policy,
                             args.condition if lora else None)
        if stats is None:  # not the main process
            return
        results[name] = stats
    table = compare_table(results)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "rewards.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "rewards.md").write_text(table + "\n")
    print(f"mean ± 95% CI half-width, {args.images_per_prompt} images per prompt of {args.prompts}:\n{table}")


def cmd_sample(args) -> None:
    from eval.generate import generate
    from eval.run import load_noise_policy
    from eval.shapes.grammar import read_jsonl
    from finetune.models.hub import load_pipeline

    starts = load_noise_policy(args.noise_policy)
    pipe = load_pipeline(args.model, lora=args.lora, condition=args.condition)
    sampler = {k: v for k, v in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance))
               if v is not None}
    generate(pipe, read_jsonl(args.metadata), args.out, args.images_per_prompt, args.seed,
             batch_size=args.batch_size, noise_policy=starts and starts.to(pipe.device), **sampler)
    print(f"sampled {args.model} into {args.out}")


def cmd_demo(args) -> None:
    """Train each recipe within a budget, then show GenEval-shapes before and after (finetune/demo.py)."""
    from finetune.config import demo_recipes, load_config
    from finetune.demo import run

    recipes = [path for name in args.recipes for path in demo_recipes(name)]
    overrides = [f"eval.images_per_prompt={args.images_per_prompt}", *args.overrides]
    for recipe in recipes:  # unknown names and bad overrides fail before anything trains
        load_config(recipe, overrides)
    print(run(recipes, Path(args.out), args.minutes, overrides, args.parallel))
    print(f"grids: {args.out}/*/before_after.png, curves: {args.out}/*/curves.png, all of it: {args.out}/summary.md")


def cmd_train(args) -> None:
    from finetune.config import load_config
    from finetune.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    history = trainer.train()
    say = trainer.accelerator.print  # once, not once per process
    evals = [h for h in history if "geneval_overall" in h]
    if len(evals) >= 2:
        say(f"GenEval-shapes overall: {evals[0]['geneval_overall']:.3f} -> {evals[-1]['geneval_overall']:.3f}")
    say(f"outputs in {cfg.output_dir}")


def cmd_diagnose_snr(args) -> None:
    from finetune.config import load_config
    from finetune.diagnostics import measure

    cfg = load_config(args.config, ["eval.every=0", "log.tensorboard=false", "log.wandb=false", "resume=false",
                                    f"output_dir={args.out}", *args.overrides])
    r = measure(cfg, args.batches, per_step=args.per_step)
    n = r["reward_calls"]
    print(f"{cfg.objective.name} on {cfg.model.path}, reward {cfg.reward if isinstance(cfg.reward, str) else dict(cfg.reward)}")
    print(f"mean training reward {r['reward_mean']:.3f}, gradient norm {r['gradient_norm']:.3g}")
    print(f"cosine between independent epoch gradients of {n} reward calls each: {r['mean_cos']:.3f} ± {r['cos_sem']:.3f} "
          f"({len(r['cosines'])} pairs)")
    print(f"per-sample SNR {r['per_sample_snr']:.2e}; samples per optimizer step for SNR 1: "
          f"{r['samples_for_snr_1']:.0f}")
    if args.per_step:
        print("step  cosine (its own gradient)  mean norm   cosine of steps 0..k together")
        for k, (one, upto) in enumerate(zip(r["steps"], r["first"])):
            print(f"{k:4d}  {one['mean_cos']:+.3f} ± {one['cos_sem']:.3f}          {one['norm']:.2e}    "
                  f"{upto['mean_cos']:+.3f} ± {upto['cos_sem']:.3f}")


def cmd_lora_merge(args) -> None:
    from finetune.models.hub import merge_lora

    merge_lora(args.model, args.lora, args.out)
    print(f"merged {args.lora} into {args.model}: {args.out}")


def cmd_rewards_list(args) -> None:
    from rewards.base import REGISTRY, _builtins
    from rewards.plugins import entry_point_names

    _builtins()
    for name in sorted(REGISTRY):
        doc = (REGISTRY[name].__doc__ or "").strip().splitlines()
        print(f"{name:<24} built-in  {doc[0] if doc else ''}")
        print(f"{'':<34}needs: {REGISTRY[name].needs or 'nothing (runs offline as it is)'}")
    for name in entry_point_names():
        print(f"{name:<24} plugin    (entry point in group diffrl.rewards)")


def cmd_rewards_score(args) -> None:
    import numpy as np
    import torch

    from eval.layout import describe_sizes, image_size, iter_images, load_image
    from rewards.base import build_reward

    rows = []  # (path, prompt, metadata); folders carry their own prompts
    loose = [Path(s) for s in args.images if not Path(s).is_dir()]
    prompts = list(args.prompts or [])
    if loose and len(prompts) not in (1, len(loose)):
        raise ValueError(f"--prompts: give one prompt for all {len(loose)} image files or one per file")
    k = 0  # index of the next loose file
    for source in args.images:
        if Path(source).is_dir():
            rows += [(path, meta["prompt"], meta) for _, meta, path in iter_images(source)]
        else:
            rows.append((Path(source), prompts[k if len(prompts) > 1 else 0], {}))
            k += 1
    # The reward scores one batch: check every file and size (headers only) before building it.
    sizes = {path: image_size(path) for path, _, _ in rows}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"--images have different sizes: {describe_sizes(sizes)}; a reward scores its images "
                         "as one batch of one size: score each size separately (one `diffrl rewards score` "
                         "per size) or resize the images to one size first")
    reward = build_reward(args.reward)
    pixels = torch.stack([torch.from_numpy(np.asarray(load_image(p), dtype=np.float32) / 255).permute(2, 0, 1)
                          for p, _, _ in rows])
    out = reward(pixels, [p for _, p, _ in rows], [m for _, _, m in rows])
    for (path, prompt, _), score in zip(rows, out.scores.tolist()):
        print(f"{score:10.4f}  {path}  {prompt!r}")
    print(f"mean {out.scores.mean():.4f} over {len(rows)} images")


def cmd_reward_serve(args) -> None:
    from rewards.remote import serve

    spec = args.reward.strip()
    if spec.startswith("{"):  # a mapping: {name: pickscore, model: ...} or a mix {pickscore: 1.0, ...}
        from omegaconf import OmegaConf

        try:
            spec = OmegaConf.to_container(OmegaConf.create(spec), resolve=True)
        except Exception as err:  # YAML and OmegaConf errors are not ValueErrors
            raise ValueError(f"--reward {args.reward!r} is not a YAML mapping: {err}") from None
    limits = {"max_request_mb": args.max_request_mb, "max_workers": args.workers, "read_timeout": args.read_timeout}
    serve(spec, host=args.host, port=args.port, **{k: v for k, v in limits.items() if v is not None})


def add_sampling_args(p) -> None:
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="image j of prompt i uses noise seed seed*1000003 + i*1000 + j")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 20)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default 4.0)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--noise-policy", help="initial-noise policy from a FIND run (output_dir/noise_policy)")
    p.add_argument("--condition", help="with a CTRL run's --lora: the class to sample (e.g. large; default: null)")


def cmd_push(args) -> None:
    from finetune.model_card import push

    print(f"uploaded {args.folder} to {push(args.folder, args.repo, private=args.private)}")


# The bench's epochs evaluate every 2 epochs on 4 images per eval prompt, so evaluation is measured too.
BENCH_OVERRIDES = ["eval.every=2", "eval.every_minutes=null", "eval.at_start=false", "eval.images_per_prompt=4"]


def cmd_bench_throughput(args) -> None:
    from finetune.bench.throughput import report, run

    parts = args.parts.split(",")
    unknown = set(parts) - {"rollout", "epoch", "evaluation", "scaling"}
    if unknown:
        raise ValueError(f"--parts: unknown {sorted(unknown)}; choose from rollout, epoch, evaluation, scaling")
    result = run(args.models, args.recipe, [*BENCH_OVERRIDES, *args.overrides], args.epochs, args.processes,
                 args.threads, parts, args.objectives, Path(args.out), cpu=args.cpu)
    print(report(result))
    print(f"written to {args.out}/throughput.md and throughput.json")


def cmd_bench_objectives(args) -> None:
    from finetune.bench.objectives import RECIPES, rebuild, run

    overrides = [f"eval.images_per_prompt={args.images_per_prompt}", *args.overrides]
    readme = Path(args.readme) if args.readme else None
    if args.from_json:
        print(rebuild(Path(args.from_json), Path(args.out), readme))
    else:
        print(run(args.objectives or list(RECIPES), Path(args.out), args.minutes, overrides, readme, args.parallel,
                  train=not args.report))
    print(f"written to {args.out}/leaderboard.md, leaderboard.json and leaderboard.png")


def train_epilog() -> str:
    from finetune.config import recipe_names
    from finetune.objectives import OBJECTIVES

    return (f"recipes (configs/NAME.yaml): {', '.join(recipe_names())}\n"
            f"CPU-sized ones (configs/demo/NAME.yaml): {', '.join(recipe_names('configs/demo'))}\n"
            f"objectives (objective.name=...): {', '.join(OBJECTIVES)}\n"
            f"real models on GPUs (configs/gpu/NAME.yaml, see its README.md): {', '.join(recipe_names('configs/gpu'))}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="diffrl", description="RL fine-tuning of text-to-image models")
    sub = ap.add_subparsers(dest="command", required=True)

    shapes = sub.add_parser("shapes", help="the shapes world").add_subparsers(dest="shapes_command", required=True)
    p = shapes.add_parser("prompts", help="write a prompt split as GenEval metadata jsonl")
    p.add_argument("--split", choices=["train", "eval"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=2023, help="split seed (the shipped splits use 2023)")
    p.set_defaults(func=cmd_shapes_prompts)
    p = shapes.add_parser("render", help="render ground-truth images in GenEval's folder layout")
    p.add_argument("--metadata", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_shapes_render)
    p = shapes.add_parser("dataset", help="ground-truth renders of a split as a Hugging Face dataset (expert data)")
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument("--out", required=True, help="folder to write (load_from_disk, or parquet with --format parquet)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["arrow", "parquet"], default="arrow")
    p.set_defaults(func=cmd_shapes_dataset)

    ev = sub.add_parser("eval", help="evaluation").add_subparsers(dest="eval_command", required=True)
    p = ev.add_parser("geneval", help="GenEval with the official rules: score a folder, or generate with a model first")
    p.add_argument("--images", help="score this folder (GenEval's layout); --out is then the results.jsonl")
    p.add_argument("--model", help="generate with this model (shapes-sd, shapes-flow, folder or hub id) into --out DIR")
    p.add_argument("--lora", help="LoRA folder from a training run (output_dir/lora) to load into --model")
    p.add_argument("--metadata", help="prompts: GenEval metadata jsonl or shapes:eval "
                   "(default: shapes:eval for the shapes models, GenEval's 553 prompts otherwise)")
    p.add_argument("--backend", help="detector backend (default: shapes for shapes prompts)")
    p.add_argument("--out", required=True, help="results.jsonl (with --images) or an output folder (with --model)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_eval_geneval)
    p = ev.add_parser("reward", help="reward models as metrics: mean, std and 95%% CI per reward")
    p.add_argument("--reward", required=True, help="one or more reward names, comma-separated")
    p.add_argument("--model", required=True)
    p.add_argument("--lora", help="LoRA folder from a training run")
    p.add_argument("--compare", action="store_true", help="also score the base model and show both side by side")
    p.add_argument("--prompts", default="shapes:eval", help="GenEval metadata jsonl or shapes:eval / shapes:train")
    p.add_argument("--out", help="folder for rewards.json and rewards.md")
    add_sampling_args(p)
    p.set_defaults(func=cmd_eval_reward)

    p = sub.add_parser("sample", help="sample a model into GenEval's folder layout")
    p.add_argument("--model", required=True, help="shapes-sd, shapes-flow, a local folder or a hub id")
    p.add_argument("--lora", help="LoRA folder from a training run (output_dir/lora) to load into --model")
    p.add_argument("--metadata", required=True)
    p.add_argument("--out", required=True)
    add_sampling_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="RL fine-tuning from a YAML recipe", epilog=train_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a recipe YAML, e.g. configs/ddpo_shapes_sd.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=5")
    p.set_defaults(func=cmd_train)

    dg = sub.add_parser("diagnose", help="diagnostics").add_subparsers(dest="diagnose_command", required=True)
    p = dg.add_parser("snr", help="gradient signal-to-noise of a recipe's objective (finetune/diagnostics.py)")
    p.add_argument("--config", required=True)
    p.add_argument("--batches", type=int, default=4, help="independent epochs to compare (pairs: n(n-1)/2)")
    p.add_argument("--out", default="runs/diagnose", help="scratch output_dir")
    p.add_argument("--per-step", action="store_true",
                   help="also split the gradient by sampler step (ddpo, flow_grpo): where signal and noise come from")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_diagnose_snr)

    rw = sub.add_parser("rewards", help="reward models").add_subparsers(dest="rewards_command", required=True)
    p = rw.add_parser("list", help="built-in rewards and installed plugins")
    p.set_defaults(func=cmd_rewards_list)
    p = rw.add_parser("score", help="score image files or a GenEval-layout folder")
    p.add_argument("--reward", required=True)
    p.add_argument("--images", nargs="+", required=True, help="image files and/or GenEval-layout folders")
    p.add_argument("--prompts", nargs="*", help="prompts for loose image files (one, or one per file)")
    p.set_defaults(func=cmd_rewards_score)
    p = rw.add_parser("serve", help="serve a reward over HTTP for `reward={name: remote, url: ...}` "
                      "(rewards/README.md)")
    p.add_argument("--reward", required=True, help="a name or a mapping, e.g. '{pickscore: 1.0, aesthetic: 0.1}'")
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only; 0.0.0.0 exposes the "
                   "unauthenticated server to the network")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (default 8765)")
    # Defaults live in rewards/remote.py (importing it here would load torch for every command).
    p.add_argument("--max-request-mb", type=float, help="largest request body accepted (default 96 MiB)")
    p.add_argument("--workers", type=int, help="connections handled at once; more get HTTP 503 (default 8)")
    p.add_argument("--read-timeout", type=float, help="seconds a client may stall a read (default 30)")
    p.set_defaults(func=cmd_reward_serve)

    lora = sub.add_parser("lora", help="LoRA utilities").add_subparsers(dest="lora_command", required=True)
    p = lora.add_parser("merge", help="fuse a trained LoRA into its base and save a full pipeline")
    p.add_argument("--model", required=True, help="the base the LoRA was trained on")
    p.add_argument("--lora", required=True, help="folder with pytorch_lora_weights.safetensors")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_lora_merge)

    p = sub.add_parser("push", help="upload a trained folder with its model card to the Hugging Face hub")
    p.add_argument("folder", help="what training wrote: output_dir/lora, output_dir/model or output_dir/noise_policy")
    p.add_argument("--repo", required=True, help="hub repository id, owner/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.set_defaults(func=cmd_push)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("throughput", help="where the time goes: rollout vs pipeline, epoch phases vs the "
                         "model-math floor, evaluation vs sampling, N-process scaling (finetune/bench/throughput.py)")
    p.add_argument("--models", nargs="+", default=["shapes-sd", "shapes-flow"],
                   help="models for the rollout rows (the first also for the evaluation row)")
    p.add_argument("--recipe", default="configs/demo/ddpo_shapes_sd.yaml", help="recipe of the epoch and scaling rows")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (evaluation every 2 by default)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts of the scaling rows")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--parts", default="rollout,epoch,evaluation,scaling", help="comma-separated subset to run")
    p.add_argument("--objectives", nargs="*", default=[], metavar="RECIPE",
                   help="also images/s (and peak GPU memory) of these recipes' epochs")
    p.add_argument("--cpu", action="store_true", help="measure on the CPU even where a GPU exists")
    p.add_argument("--out", default="runs/bench", help="folder for throughput.md and throughput.json")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the recipe, after the bench's own: "
                   + " ".join(BENCH_OVERRIDES))
    p.set_defaults(func=cmd_bench_throughput)

    p = bench.add_parser("objectives", help="the leaderboard: every objective on its shapes model for the same "
                         "training minutes; table, JSON and PNG (finetune/bench/objectives.py)")
    p.add_argument("--objectives", nargs="+", default=None, help="default: all of them")
    p.add_argument("--minutes", type=float, default=10.0, help="training minutes per objective")
    p.add_argument("--images-per-prompt", type=int, default=8, help="per eval prompt, at the start, half way, the end")
    p.add_argument("--parallel", type=int, help="objectives trained at once (default: one per core)")
    p.add_argument("--out", default="runs/leaderboard", help="leaderboard.{md,json,png}; the runs in OUT/runs")
    p.add_argument("--readme", help="also replace this README's objectives table (between the leaderboard markers)")
    p.add_argument("--report", action="store_true", help="only rebuild the tables from the runs already in OUT/runs")
    p.add_argument("--from-json", metavar="FILE", help="only rebuild the tables and the PNG from a saved "
                   "leaderboard.json (docs/leaderboard.json: the README's table)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every recipe")
    p.set_defaults(func=cmd_bench_objectives)

    p = sub.add_parser("demo", help="the README main job: RL on both shipped models, GenEval before/after")
    p.add_argument("--out", default="runs/demo",
                   help="one folder per recipe (an earlier run's is kept as NAME.previous)")
    p.add_argument("--recipes", nargs="+", default=["ddpo_shapes_sd", "nft_full_shapes_flow"],
                   help="demo recipe names (configs/demo/NAME.yaml), objective names (dro: its demo recipes on "
                   "both models) or YAML paths")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="training minutes per recipe (evaluations come on top: under 20 minutes in all on 2 cores)")
    p.add_argument("--images-per-prompt", type=int, default=8, help="per eval prompt, at the start, half way, the end")
    p.add_argument("--parallel", type=int, help="recipes trained at once (default: one per core)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every recipe")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError, FloatingPointError) as err:
        print(f"diffrl: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
