"""The documentation agrees with the code: every command line in README.md and docs/ runs one of our scripts with
flags its parser accepts (values included), every flag named in a guide's prose exists in that guide's script,
TOML/JSON examples pass the checks the real files get, sample-prompt lines parse, shown error messages are the
ones the scripts print, and relative links and anchors resolve.

The first tests check the checker on small made-up documents, so that a broken extractor cannot pass silently.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from doc_commands import (
    LORA_TOOLS,
    REPO,
    TRAINING_SCRIPTS,
    Block,
    check_command,
    check_document,
    check_error_examples,
    check_inline_flags,
    check_prompt_lines,
    check_structured_block,
    collect,
    markdown_files,
    option_names,
    relative,
    script_status,
)

DOCS = markdown_files()
GUIDES = {"docs/train_network.md": "train_network.py", "docs/sdxl_train_network.md": "sdxl_train_network.py",
          "docs/sd3_train_network.md": "sd3_train_network.py"}


def _write(tmp_path: Path, text: str, name: str = "guide.md") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the checker itself


def test_a_wrong_flag_in_a_command_is_named_with_file_and_line(tmp_path):
    text = ("# Guide\n\n```bash\naccelerate launch --num_cpu_threads_per_process 1 train_network.py \\\n"
            "  --pretrained_model_name_or_path=model.safetensors \\\n  --network_dimm=16 --save_every_n_epochs=1\n```\n")
    document = collect(_write(tmp_path, text), doc="docs/x.md")
    [command] = document.commands()
    assert command.script == "train_network.py" and command.launcher == ("--num_cpu_threads_per_process", "1")
    assert command.argv[-1] == "--save_every_n_epochs=1"
    assert check_command(command) == ["docs/x.md:6: --network_dimm is not a flag of train_network.py"]


def test_a_bad_value_or_a_rejected_flag_fails_the_command(tmp_path):
    text = ("```bash\npython train_network.py --mixed_precision=fp32\n"
            "python sd3_train_network.py --noise_offset 0.1 && python sdxl_train_network.py --network_dim 8\n```\n")
    first, second, third = collect(_write(tmp_path, text), doc="d.md").commands()
    [problem] = check_command(first)
    assert problem.startswith("d.md:2: train_network.py refuses this command:") and "fp32" in problem
    [problem] = check_command(second)
    assert problem.startswith("d.md:3: sd3_train_network.py") and "--noise_offset is not supported" in problem
    assert third.script == "sdxl_train_network.py" and check_command(third) == []


def test_missing_scripts_abbreviations_and_launcher_options_are_caught(tmp_path):
    text = ("```bash\npython no_such_trainer.py --x 1\npython train_network.py --network_di 4\n"
            "accelerate launch --num_proceses 2 train_network.py\npython -m pytest -q\npip install -e .\n```\n")
    commands = collect(_write(tmp_path, text), doc="d.md").commands()
    assert [c.script for c in commands] == ["no_such_trainer.py", "train_network.py", "train_network.py"]
    assert check_command(commands[0]) == ["d.md:2: no_such_trainer.py does not exist"]
    assert check_command(commands[1]) == ["d.md:3: --network_di is not a flag of train_network.py"]
    assert check_command(commands[2]) == ["d.md:4: --num_proceses is not an option of accelerate launch"]
    shell = collect(_write(tmp_path, "```bash\nbash tools/demo.sh\nbash tools/no_such.sh\n```\n"), doc="d.md").commands()
    assert [check_command(c) for c in shell] == [[], ["d.md:3: tools/no_such.sh does not exist"]]


def test_notation_for_omitted_and_optional_flags_is_not_an_argument(tmp_path):
    text = ("```bash\naccelerate launch sd3_train_network.py \\\n  --pretrained_model_name_or_path=m.safetensors "
            "[--clip_l=… --t5xxl=…] \\\n  …\n```\n")
    [command] = collect(_write(tmp_path, text), doc="d.md").commands()
    assert command.argv == ("--pretrained_model_name_or_path=m.safetensors", "--clip_l=…", "--t5xxl=…")
    assert check_command(command) == []


def test_prose_flags_belong_to_the_guide_or_the_script_its_line_names(tmp_path):
    text = ("# `sdxl_train_network.py`\n\nUse `--text_encoder_lr1 LR` and `--network_dim N`.\n"
            "`--blocks_to_swap` exists only in `sd3_train_network.py`.\n"
            "`--t5xxl_device` is for SD3.\n"
            "Give prompts `--w 1024 --h 1024`; run `accelerate launch --multi_gpu --num_processes 2 train_network.py …`.\n")
    document = collect(_write(tmp_path, text), doc="docs/sdxl_train_network.md")
    assert check_inline_flags(document) == ["docs/sdxl_train_network.md:5: --t5xxl_device is not a flag of sdxl_train_network.py"]


def test_toml_blocks_are_checked_as_the_files_they_stand_for():
    def block(text: str, lang: str = "toml") -> Block:
        return Block("d.md", lang, 10, tuple((11 + i, line) for i, line in enumerate(text.splitlines())))

    dataset = '[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = "/nowhere"\n  num_repeat = 3\n'
    [problem] = check_structured_block(block(dataset), ("train_network.py",))
    assert problem.startswith("d.md:10 (dataset config):") and "did you mean 'num_repeats'" in problem
    assert check_structured_block(block(dataset.replace("num_repeat", "num_repeats")), ("train_network.py",)) == []
    [problem] = check_structured_block(block('[[prompt]]\nprompt = "a dog"\nsteps = 20\n'), ())
    assert "unknown sample prompt keys ['steps']" in problem
    flags = '[training]\nmax_train_epochs = 10\nnetwork_dim = "x"\n'
    [problem] = check_structured_block(block(flags), ("train_network.py",))
    assert "'network_dim' must be a whole number" in problem
    [problem] = check_structured_block(block("weighting_scheme = 'sigma_sqrt'\n"), ("train_network.py",))
    assert "'weighting_scheme' is not a flag of train_network.py" in problem
    assert check_structured_block(block("weighting_scheme = 'sigma_sqrt'\n"), ("sd3_train_network.py",)) == []
    assert check_structured_block(block('{"a": 1,}', "json"), ())[0].startswith("d.md:10: not valid JSON")
    assert check_structured_block(block("import torch\npipe.load_lora_weights('x'\n", "python"), ()) == [
        "d.md:12: not valid Python: '(' was never closed"]


def test_prompt_lines_and_error_examples_are_checked():
    prompts = Block("d.md", "", 1, ((2, "a dog --w 512 --h 768 --d 42"), (3, "a cat --l seven"), (4, "a fox --q 3")))
    problems = check_prompt_lines(prompts)
    assert problems[0] == "d.md:3: --l needs a float, got 'seven'" and problems[1].startswith("d.md:4: unknown sample option --q")
    errors = Block("d.md", "", 1, (
        (2, "train_network.py: error: --deepspeed is not supported: DeepSpeed is not supported yet; use plain DDP via accelerate launch"),
        (3, "sd3_train_network.py: error: --noise_offset is not supported: something else"),
        (4, "train_network.py: error: --network_dim is not supported: whatever")))
    problems = check_error_examples(errors)
    assert len(problems) == 2
    assert problems[0].startswith("d.md:3: sd3_train_network.py prints '--noise_offset is not supported: SD3 is")
    assert problems[1] == "d.md:4: train_network.py accepts --network_dim, but the guide shows it refused"


# ----------------------------------------------------------------------------- the real documents


@pytest.mark.parametrize("path", DOCS, ids=relative)
def test_document_agrees_with_the_code(path):
    problems = check_document(collect(path))
    assert not problems, "the documentation disagrees with the code:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc, script", sorted(GUIDES.items()))
def test_each_training_guide_shows_a_full_command_of_its_script(doc, script):
    commands = [c for c in collect(REPO / doc).commands() if c.script == script]
    assert commands, f"{doc} shows no command line of {script}"
    longest = max(commands, key=lambda c: len(c.argv))
    assert len(longest.argv) >= 15 and not check_command(longest)
    flags = {item.flag for item in collect(REPO / doc).inline_flags}
    assert len(flags & option_names(script)) >= 25, f"{doc} names few of {script}'s flags; is the extractor broken?"


@pytest.mark.parametrize("doc", ["docs/zh/sd3_train_network.md", "docs/zh/sdxl_train_network.md"])
def test_translated_guides_keep_the_english_commands_and_flags(doc):
    english = REPO / doc.replace("docs/zh/", "docs/")
    translated = REPO / doc
    if not translated.is_file():
        pytest.skip(f"{doc} is not written yet")
    commands = lambda path: [(c.script, c.argv) for c in collect(path).commands()]  # noqa: E731
    assert commands(translated) == commands(english)
    flags = lambda path: {item.flag for item in collect(path).inline_flags}  # noqa: E731
    assert flags(english) <= flags(translated), f"{doc} lacks {sorted(flags(english) - flags(translated))}"


def test_the_tools_guide_covers_every_lora_tool_that_exists():
    guide = REPO / "docs" / "lora_tools.md"
    if not guide.is_file():
        pytest.skip("docs/lora_tools.md is not written yet")
    document = collect(guide)
    shown = {c.script for c in document.commands()}
    for tool in LORA_TOOLS:
        if script_status(tool) == "ok":
            assert tool in shown, f"docs/lora_tools.md shows no command line of {tool}"


# ----------------------------------------------------------------------------- links


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen, fenced = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"^#{1,6}\s+(.*)$", line)
        if match:
            anchor = _anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            anchors.add(anchor if count == 0 else f"{anchor}-{count}")
    return anchors


@pytest.mark.parametrize("path", DOCS, ids=relative)
def test_relative_links_and_anchors_resolve(path):
    problems = []
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f"{relative(path)}:{number}: link to missing {file_part}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                problems.append(f"{relative(path)}:{number}: {file_part or relative(path)} has no heading #{anchor}")
    assert not problems, "\n".join(problems)


def test_every_guide_is_reachable_from_the_readme():
    linked = set()
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if not re.match(r"[a-z]+:", target):
                linked.add(relative((path.parent / target).resolve()))
    orphans = [relative(p) for p in DOCS[1:] if relative(p) not in linked]
    assert not orphans, f"no document links to {orphans}"


def test_training_scripts_exist():
    assert all(script_status(script) == "ok" for script in TRAINING_SCRIPTS)
