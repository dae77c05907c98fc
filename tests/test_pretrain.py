import collections

import torch

from flowopd.trainers.pretrain import debiased_ema


def test_debiased_ema_is_the_average_of_the_trained_weights_alone():
    d, init = 0.9, {"w": torch.tensor([5.0, -3.0], dtype=torch.float64)}
    ws = [torch.tensor([float(k), 2.0 * k], dtype=torch.float64) for k in range(1, 8)]
    ema = {"w": init["w"].clone()}
    for w in ws:
        ema["w"].lerp_(w, 1 - d)
    n = len(ws)
    # exact weights of the trained iterates: (1 - d) d^(n-k), renormalised to sum to 1 without the init's d^n
    expect = sum((1 - d) * d ** (n - k) * w for k, w in enumerate(ws, 1)) / (1 - d ** n)
    got = debiased_ema(ema, init, d, n)["w"]
    assert torch.allclose(got, expect, atol=1e-12)
    assert not torch.allclose(ema["w"], expect)  # the raw EMA still holds d^n of the init
    # constant trained weights come back exactly; no update leaves the EMA as it is
    const = {"w": init["w"].clone()}
    for _ in range(5):
        const["w"].lerp_(torch.ones(2, dtype=torch.float64), 1 - d)
    assert torch.allclose(debiased_ema(const, init, d, 5)["w"], torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert debiased_ema(init, init, d, 0)["w"] is init["w"]


def test_category_weights_choose_the_pretraining_mix():
    from flowopd.world.prompts import CATEGORIES, parse
    from flowopd.trainers.pretrain import build_dataset

    only = {c: 0.0 for c in CATEGORIES} | {"position": 2.0, "color_attr": 1.0}
    prompts, images = build_dataset(60, 0, 0.0, 1, only)
    cats = [parse(p).category for p in prompts]
    assert images.shape == (60, 32, 32, 3) and set(cats) == {"position", "color_attr"}
    assert cats.count("position") > cats.count("color_attr")
    # no weights: the uniform draw of before, prompt for prompt
    assert build_dataset(20, 3, 0.1, 1)[0] == build_dataset(20, 3, 0.1, 1, {})[0]


def test_text_length_weights_choose_the_sign_lengths():
    import pytest

    from flowopd.config import ConfigError, build
    from flowopd.trainers.pretrain import PretrainConfig, _identity, build_dataset
    from flowopd.world.prompts import parse, text_is_heldout

    prompts, _ = build_dataset(80, 1, 1.0, 1, {}, [1, 0, 0, 0])
    signs = [parse(p).text for p in prompts]
    assert len(signs) == 80 and {len(t) for t in signs} == {1}
    assert not any(text_is_heldout(t) for t in signs)  # only training strings, as without weights
    prompts, _ = build_dataset(80, 1, 1.0, 1, {}, [0, 0, 1, 3])
    lengths = [len(parse(p).text) for p in prompts]
    assert set(lengths) == {3, 4} and lengths.count(4) > lengths.count(3)
    # [] is the uniform draw of before, prompt for prompt; and it leaves the run's identity unchanged
    assert build_dataset(20, 3, 0.5, 1)[0] == build_dataset(20, 3, 0.5, 1, {}, [])[0]
    assert "text_length_weights" not in _identity(build(PretrainConfig, {}))
    assert _identity(build(PretrainConfig, {"text_length_weights": [1, 1, 1, 0]}))["text_length_weights"] == [1, 1, 1, 0]
    # a run written before the key `patch` existed resumes: at its default the key is not part of the identity
    assert "patch" not in _identity(build(PretrainConfig, {}))
    assert _identity(build(PretrainConfig, {"patch": 2, "channels": [8, 8]}))["patch"] == 2
    for bad in ([1, 1, 1], [0, 0, 0, 0], [1, -1, 1, 1]):
        with pytest.raises(ConfigError, match="text_length_weights"):
            build(PretrainConfig, {"text_length_weights": bad})


def test_continued_pretraining_starts_from_the_checkpoint(tmp_path, capsys):
    import pytest

    from flowopd.backends import load_checkpoint
    from flowopd.config import ConfigError, load
    from flowopd.trainers.pretrain import PretrainConfig, pretrain

    tiny = dict(batch_size=4, dataset_size=8, channels=[8, 8, 8], state_every=0, warmup=1)
    first = pretrain(PretrainConfig(steps=2, **tiny), tmp_path / "a")
    w0 = load_checkpoint(first).model.state_dict()
    second = pretrain(PretrainConfig(steps=1, init=str(first), lr=1e-9, **{**tiny, "channels": [16, 16, 16]}),
                      tmp_path / "b")
    got = load_checkpoint(second)
    assert got.model.cfg.channels == (8, 8, 8)  # the checkpoint's model, not the config's channels
    out = capsys.readouterr()
    assert "channels=[8, 8, 8]" in out.out + out.err and "do not apply" in out.out + out.err  # and it says so
    pretrain(PretrainConfig(steps=1, init=str(first), lr=1e-9, **tiny), tmp_path / "c")
    out = capsys.readouterr()
    assert "do not apply" not in out.out + out.err  # the same model keys: nothing to say
    # one update at lr 1e-9 from the checkpoint's weights: still those weights, up to float32 rounding of
    # the EMA, which debiasing after one update multiplies by 1 / (1 - 0.999) = 1000
    assert all(torch.allclose(v, w0[k], atol=1e-3) for k, v in got.model.state_dict().items())
    with pytest.raises(ConfigError, match="unknown categories"):
        load(PretrainConfig, None, ["category_weights={spatial: 2}"])


def test_stages_run_in_turn_each_continuing_from_the_last_and_a_rerun_skips_finished_ones(tmp_path):
    import json

    from flowopd.backends import load_checkpoint
    from flowopd.trainers.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(steps=2, batch_size=4, dataset_size=8, channels=[8, 8, 8], state_every=0, warmup=1,
                         stages=[{"text_fraction": 0.0}, {"steps": 1, "lr": 1e-9, "ema_decay": 0.5}])
    final = pretrain(cfg, tmp_path / "run")
    s0, s1 = tmp_path / "run" / "stage_0", tmp_path / "run" / "stage_1"
    assert json.loads((s0 / "run.json").read_text())["text_fraction"] == 0.0
    run1 = json.loads((s1 / "run.json").read_text())
    assert run1["init"] == str(s0 / "final") and run1["lr"] == 1e-9 and run1["text_fraction"] == 0.4
    # the shipped weights are the last stage's; the recipe is the whole curriculum, the steps their sum
    w_final, w_last = load_checkpoint(final).model.state_dict(), load_checkpoint(s1 / "final").model.state_dict()
    assert all(torch.equal(v, w_last[k]) for k, v in w_final.items())
    meta = json.loads((final / "config.json").read_text())["meta"]
    assert meta["step"] == 3 and meta["recipe"]["stages"] == cfg.stages
    # stage 1 (one step at lr 1e-9) keeps stage 0's weights: it continued from them
    w0 = load_checkpoint(s0 / "final").model.state_dict()
    assert all(torch.allclose(v, w0[k], atol=1e-4) for k, v in w_last.items())
    # a rerun finds both stages done and trains nothing
    stamp = (s0 / "final" / "model.safetensors").stat().st_mtime_ns
    pretrain(cfg, tmp_path / "run")
    assert (s0 / "final" / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_stage_may_not_set_its_own_init():
    import pytest

    from flowopd.config import ConfigError, load
    from flowopd.trainers.pretrain import PretrainConfig

    with pytest.raises(ConfigError, match="may not set"):
        load(PretrainConfig, None, ["stages=[{steps: 1}, {init: base}]"])
    with pytest.raises(ConfigError, match="lr must be > 0"):
        load(PretrainConfig, None, ["stages=[{lr: 0}]"])


def test_a_curriculum_gives_the_weights_of_its_stages_run_one_by_one(tmp_path):
    """`stages` is the same as running each stage as its own run with init= the one before: bit for
    bit on the CPU, so a base made stage by stage is what the one-command recipe makes."""
    from flowopd.backends import load_checkpoint
    from flowopd.trainers.pretrain import PretrainConfig, pretrain

    tiny = dict(batch_size=4, dataset_size=8, channels=[8, 8, 8], state_every=0, warmup=1)
    stages = [{"steps": 2, "text_fraction": 0.0, "category_weights": {"position": 1}},
              {"steps": 1, "text_fraction": 0.5, "lr": 5e-4}]
    staged = pretrain(PretrainConfig(sigma_mean=1.0, stages=stages, **tiny), tmp_path / "staged")
    a = pretrain(PretrainConfig(sigma_mean=1.0, **{**tiny, **stages[0]}), tmp_path / "a")
    b = pretrain(PretrainConfig(sigma_mean=1.0, init=str(a), **{**tiny, **stages[1]}), tmp_path / "b")
    w_staged, w_b = load_checkpoint(staged).model.state_dict(), load_checkpoint(b).model.state_dict()
    assert all(torch.equal(v, w_b[k]) for k, v in w_staged.items())


def test_word_dropout_hides_attribute_words_only_and_is_off_by_default():
    from flowopd.backends.tiny_model import ATTRIBUTE_WORDS, UNK, Tokenizer
    from flowopd.trainers.pretrain import Batches, PretrainConfig

    base = dict(batch_size=256, dataset_size=256, text_fraction=0.3, seed=1, p_uncond=0.0)
    plain = Batches(PretrainConfig(**base), "cpu")
    hidden = Batches(PretrainConfig(word_dropout=0.5, **base), "cpu")
    x0, ids0, _ = plain.draw(torch.Generator().manual_seed(0))
    x, ids, _ = hidden.draw(torch.Generator().manual_seed(0))
    assert torch.equal(x, x0)  # the same renders: dropout draws after the batch is chosen
    attr = torch.isin(ids0, torch.tensor([Tokenizer.vocab[w] for w in ATTRIBUTE_WORDS]))
    changed = ids != ids0
    assert (UNK not in ids0) and (ids[changed] == UNK).all()  # grammar prompts have no unknown word
    assert not (changed & ~attr).any()  # connectives, articles and sign characters stay
    assert 0.4 < changed.sum() / attr.sum() < 0.6


def test_a_text_encoder_without_layers_keeps_each_token_to_itself():
    from flowopd.backends.tiny_model import TinyConfig, TinyUNet, Tokenizer

    m = TinyUNet(TinyConfig(channels=(8, 8, 8), text_dim=16, text_layers=0, heads=2, groups=4, cond_dim=16, roles=True))
    ids, slots = Tokenizer().batch(["a red square and a blue circle", "a red square and a green circle"])
    tokens, pad, _ = m.encode(ids, slots)
    # the words before "green"/"blue" are the same in both prompts, and so are their features
    assert torch.allclose(tokens[0, :4], tokens[1, :4]) and not torch.allclose(tokens[0, 5], tokens[1, 5])
    assert not any("encoder" in k for k in m.state_dict())


def test_caption_noise_flips_relations_and_swaps_colours_only_and_keeps_the_renders():
    from flowopd.backends.tiny_model import Tokenizer
    from flowopd.trainers.pretrain import Batches, PretrainConfig
    from flowopd.world.prompts import COLORS

    v = Tokenizer.vocab
    base = dict(batch_size=512, dataset_size=512, text_fraction=0.2, seed=2, p_uncond=0.0,
                category_weights={"position": 1, "color_attr": 1, "colors": 1})
    plain = Batches(PretrainConfig(**base), "cpu")
    noisy = Batches(PretrainConfig(relation_noise=0.3, binding_noise=0.4, **base), "cpu")
    noisy.heldout_rows = set()  # the noise alone (the filter of test-split captions: the test below)
    x0, ids0, s0 = plain.draw(torch.Generator().manual_seed(0))
    x, ids, s = noisy.draw(torch.Generator().manual_seed(0))
    assert torch.equal(x, x0) and torch.equal(s, s0)  # the same renders and slots: only words change
    rel = torch.tensor([v[w] for w in ("left", "right", "above", "below")])
    col = torch.tensor([v[c] for c in COLORS])
    has_rel = torch.isin(ids0, rel).any(1)
    two_col = torch.isin(ids0, col).sum(1) == 2
    changed = (ids != ids0).any(1)
    assert not (changed & ~has_rel & ~two_col).any()  # signs, single objects: untouched
    flipped = changed & has_rel
    opposite = {v["left"]: v["right"], v["right"]: v["left"], v["above"]: v["below"], v["below"]: v["above"]}
    for i in flipped.nonzero().flatten().tolist():  # the relation word became its opposite, nothing else moved
        d = (ids[i] != ids0[i]).nonzero().flatten().tolist()
        assert len(d) == 1 and opposite[ids0[i, d[0]].item()] == ids[i, d[0]].item()
    assert 0.2 < flipped.sum() / has_rel.sum() < 0.4
    distinct = torch.tensor([len(set(r[torch.isin(r, col)].tolist())) == 2 for r in ids0])  # a swap shows
    swapped = changed & two_col
    for i in swapped.nonzero().flatten().tolist():  # the two colours traded places
        d = (ids[i] != ids0[i]).nonzero().flatten().tolist()
        assert len(d) == 2 and ids[i, d[0]] == ids0[i, d[1]] and ids[i, d[1]] == ids0[i, d[0]]
    assert 0.3 < swapped.sum() / distinct.sum() < 0.5


def test_caption_noise_never_writes_a_test_split_caption():
    from flowopd.backends.tiny_model import Tokenizer
    from flowopd.trainers.pretrain import Batches, PretrainConfig
    from flowopd.world.prompts import is_heldout, test_captions, test_split

    captions = test_captions()
    assert all(is_heldout(p) for p in captions) and {p.text for p in test_split()} <= set(captions)
    heldout = {tuple(r) for r in Tokenizer().batch(captions)[0].tolist()}
    base = dict(batch_size=1024, dataset_size=1024, text_fraction=0.3, seed=4, p_uncond=0.0,
                category_weights={"position": 1, "color_attr": 1})
    clean = Batches(PretrainConfig(**base), "cpu").draw(torch.Generator().manual_seed(0))[1]
    noisy = Batches(PretrainConfig(relation_noise=0.5, binding_noise=0.5, glyph_noise=0.5, attribute_noise=0.3,
                                   **base), "cpu")
    ids = noisy.draw(torch.Generator().manual_seed(0))[1]
    noisy.heldout_rows = set()  # the same draw unfiltered
    raw = noisy.draw(torch.Generator().manual_seed(0))[1]
    assert not any(tuple(r) in heldout for r in clean.tolist())  # the training data itself is clean
    leak = torch.tensor([tuple(r) in heldout for r in raw.tolist()])
    assert leak.sum() > 20  # unfiltered, the noise names test combinations (flipped relations, swapped pairs)
    assert not any(tuple(r) in heldout for r in ids.tolist())
    assert torch.equal(ids[leak], clean[leak]) and torch.equal(ids[~leak], raw[~leak])  # only those rows revert


def test_attribute_noise_changes_counts_shapes_and_colours_only_to_another_of_their_kind():
    from flowopd.backends.tiny_model import Tokenizer
    from flowopd.trainers.pretrain import Batches, PretrainConfig
    from flowopd.world.prompts import COLORS, COUNT_WORDS, SHAPES

    v = Tokenizer.vocab
    kinds = [list(COUNT_WORDS), list(SHAPES), [s + "s" for s in SHAPES], list(COLORS)]
    kind = {v[w]: k for k, ws in enumerate(kinds) for w in ws}
    base = dict(batch_size=1024, dataset_size=1024, text_fraction=0.2, seed=5, p_uncond=0.0)
    x0, ids0, s0 = Batches(PretrainConfig(**base), "cpu").draw(torch.Generator().manual_seed(0))
    noisy = Batches(PretrainConfig(attribute_noise=0.25, **base), "cpu")
    noisy.heldout_rows = set()  # the noise alone
    x, ids, s = noisy.draw(torch.Generator().manual_seed(0))
    assert torch.equal(x, x0) and torch.equal(s, s0)
    changed = ids != ids0
    before, after = ids0[changed].tolist(), ids[changed].tolist()
    assert all(a in kind and b in kind and kind[a] == kind[b] and a != b for a, b in zip(before, after))
    n_attr = sum(t in kind for t in ids0.flatten().tolist())
    assert 0.21 < len(before) / n_attr < 0.29
    colours_now = collections.Counter(b for a, b in zip(before, after) if kind[a] == 3)
    assert len(colours_now) == len(COLORS)  # every colour is reached


def test_glyph_noise_changes_sign_characters_only_to_other_characters():
    from flowopd.backends.tiny_model import Tokenizer
    from flowopd.trainers.pretrain import Batches, PretrainConfig

    base = dict(batch_size=512, dataset_size=512, text_fraction=0.5, seed=3, p_uncond=0.0)
    x0, ids0, _ = Batches(PretrainConfig(**base), "cpu").draw(torch.Generator().manual_seed(0))
    x, ids, _ = Batches(PretrainConfig(glyph_noise=0.2, **base), "cpu").draw(torch.Generator().manual_seed(0))
    assert torch.equal(x, x0)
    is_char = ids0 >= Tokenizer.char_base
    changed = ids != ids0
    assert not (changed & ~is_char).any() and (ids[changed] >= Tokenizer.char_base).all()
    assert (ids < Tokenizer.size).all()
    assert 0.15 < changed.sum() / is_char.sum() < 0.25


def test_signs_train_at_their_own_noise_levels_when_text_sigma_mean_is_set():
    from flowopd.losses import logit_normal_sigmas
    from flowopd.trainers.pretrain import Batches, PretrainConfig, noise_levels

    base = dict(batch_size=256, dataset_size=256, text_fraction=0.5, seed=2, p_uncond=0.5, sigma_std=0.1)
    data = Batches(PretrainConfig(**base), "cpu")
    x0, _, _ = data.draw(torch.Generator().manual_seed(0))
    ink = (x0 == -1).all(1).flatten(1).any(1)  # black pixels: only a sign's glyphs are black
    assert torch.equal(data.last_is_text, ink) and 0.3 < ink.float().mean() < 0.7  # dropped prompts too
    split = noise_levels(PretrainConfig(sigma_mean=4.0, text_sigma_mean=-4.0, **base), ink,
                         torch.Generator().manual_seed(1), "cpu")
    assert (split[ink] < 0.05).all() and (split[~ink] > 0.95).all()
    # unset: the one draw of before, and nothing more taken from the generator
    g, ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    same = noise_levels(PretrainConfig(sigma_mean=4.0, **base), ink, g, "cpu")
    assert torch.equal(same, logit_normal_sigmas(256, 4.0, 0.1, generator=ref))
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=ref))


def test_caption_noise_is_refused_past_one_half():
    from flowopd.config import ConfigError
    from flowopd.trainers.pretrain import CAPTION_NOISE_KEYS, PretrainConfig

    import pytest

    assert set(CAPTION_NOISE_KEYS) == {"relation_noise", "binding_noise", "glyph_noise", "attribute_noise"}
    for key in CAPTION_NOISE_KEYS:
        with pytest.raises(ConfigError, match=key):
            PretrainConfig(**{key: 0.6}).validate()


def test_a_pretrained_prompt_encoder_is_loaded_and_stays_frozen_while_the_rest_trains(tmp_path):
    import pytest
    from safetensors.torch import save_file

    from flowopd.backends import load_checkpoint
    from flowopd.backends.tiny_model import TextEncoder, TinyConfig
    from flowopd.config import ConfigError, load
    from flowopd.errors import UserError
    from flowopd.trainers.pretrain import PretrainConfig, pretrain

    torch.manual_seed(5)
    enc = TextEncoder(TinyConfig(roles=True)).state_dict()
    save_file(enc, str(tmp_path / "enc.safetensors"))
    tiny = dict(batch_size=4, dataset_size=8, channels=[8, 8, 8], state_every=0, warmup=1, roles=True, lr=1e-2)
    frozen = load_checkpoint(pretrain(PretrainConfig(steps=3, text_init=str(tmp_path / "enc.safetensors"),
                                                     freeze_text=True, **tiny), tmp_path / "a")).model.state_dict()
    assert all(torch.equal(frozen["text." + k], v) for k, v in enc.items())  # bit for bit, through the EMA save
    # the rest trains: the same run at a vanishing learning rate ends elsewhere
    still = load_checkpoint(pretrain(PretrainConfig(steps=3, text_init=str(tmp_path / "enc.safetensors"),
                                                    freeze_text=True, **{**tiny, "lr": 1e-12}),
                                     tmp_path / "b")).model.state_dict()
    assert not torch.allclose(frozen["conv_in.weight"], still["conv_in.weight"])
    # not frozen: the loaded encoder trains on
    thawed = load_checkpoint(pretrain(PretrainConfig(steps=3, text_init=str(tmp_path / "enc.safetensors"), **tiny),
                                      tmp_path / "c")).model.state_dict()
    assert not all(torch.equal(thawed["text." + k], v) for k, v in enc.items())
    with pytest.raises(UserError, match="no such file"):
        pretrain(PretrainConfig(steps=1, text_init=str(tmp_path / "missing.safetensors"), **tiny), tmp_path / "d")
    with pytest.raises(ConfigError, match="give one of the two"):  # init keeps its checkpoint's own encoder
        load(PretrainConfig, None, [f"init={tmp_path / 'a' / 'final'}", f"text_init={tmp_path / 'enc.safetensors'}"])
    with pytest.raises(UserError, match="does not fit"):  # an encoder with roles, a model without
        pretrain(PretrainConfig(steps=1, text_init=str(tmp_path / "enc.safetensors"), **{**tiny, "roles": False}),
                 tmp_path / "e")


def test_damp_keeps_that_share_of_the_change_from_the_random_initial_weights(tmp_path):
    """A damped run saves r + damp * (w - r), r the random weights its model and seed start from; a
    stage that sets damp damps its own weights (toward stage 0's r: same model, same seed) and the
    next stage continues from them, as if each stage were run alone."""
    import pytest

    from flowopd.backends import load_checkpoint
    from flowopd.backends.tiny_model import TinyConfig
    from flowopd.config import ConfigError, load
    from flowopd.trainers.pretrain import PretrainConfig, initial_weights, pretrain

    tiny = dict(steps=2, batch_size=4, dataset_size=8, channels=[8, 8, 8], state_every=0, warmup=1)
    full = load_checkpoint(pretrain(PretrainConfig(**tiny), tmp_path / "full")).model.state_dict()
    half = load_checkpoint(pretrain(PretrainConfig(damp=0.5, **tiny), tmp_path / "half")).model.state_dict()
    r = initial_weights(TinyConfig(channels=(8, 8, 8)), 0)
    assert any(not torch.allclose(v, r[k]) for k, v in full.items())  # it trained
    for k, v in full.items():
        assert torch.allclose(half[k], r[k] + 0.5 * (v - r[k]), atol=1e-6)

    # a curriculum damped after its first stage == the stages run alone, the second from the damped first
    stages = [{"text_fraction": 0.0, "damp": 0.25}, {"steps": 1, "lr": 5e-4}]
    staged = load_checkpoint(pretrain(PretrainConfig(stages=stages, **tiny), tmp_path / "staged")).model.state_dict()
    a = pretrain(PretrainConfig(**{**tiny, **stages[0]}), tmp_path / "a")
    plain_a = load_checkpoint(pretrain(PretrainConfig(**{**tiny, "text_fraction": 0.0}), tmp_path / "pa")).model.state_dict()
    wa = load_checkpoint(a).model.state_dict()
    for k, v in plain_a.items():
        assert torch.allclose(wa[k], r[k] + 0.25 * (v - r[k]), atol=1e-6)
    b = pretrain(PretrainConfig(init=str(a), **{**tiny, **stages[1]}), tmp_path / "b")
    wb = load_checkpoint(b).model.state_dict()
    assert all(torch.equal(v, wb[k]) for k, v in staged.items())
    # damping a run from init goes toward the same r (rebuilt from the init's model and the seed)
    c = pretrain(PretrainConfig(init=str(a), damp=0.5, **{**tiny, **stages[1]}), tmp_path / "c")
    wc = load_checkpoint(c).model.state_dict()
    for k, v in wb.items():
        assert torch.allclose(wc[k], r[k] + 0.5 * (v - r[k]), atol=1e-6)
    with pytest.raises(ConfigError, match="damp must be in"):
        load(PretrainConfig, None, ["damp=0"])
    with pytest.raises(ConfigError, match="text_init"):
        load(PretrainConfig, None, ["damp=0.5", "text_init=x.safetensors"])


def test_sign_blur_moves_only_the_final_weights_sign_rows_once(tmp_path):
    """sign_blur: the final weights are the unblurred ones with blur_sign_tokens applied (training is
    the same); in a curriculum the stages stay as trained and only out/final is blurred, once."""
    import json

    import pytest

    from flowopd.backends.tiny import read_weights
    from flowopd.backends.tiny_model import Tokenizer
    from flowopd.config import ConfigError, load
    from flowopd.trainers.pretrain import PretrainConfig, blur_sign_tokens, pretrain

    tiny = dict(steps=2, batch_size=4, dataset_size=8, channels=[8, 8, 8], state_every=0, warmup=1)
    plain = read_weights(pretrain(PretrainConfig(**tiny), tmp_path / "plain") / "model.safetensors")
    blurred = read_weights(pretrain(PretrainConfig(sign_blur=0.4, **tiny), tmp_path / "one") / "model.safetensors")
    expect = blur_sign_tokens(plain, 0.4, 1234)
    assert all(torch.equal(blurred[k], expect[k]) for k in plain)
    cb = Tokenizer.char_base
    assert not torch.equal(blurred["text.tok.weight"][cb:], plain["text.tok.weight"][cb:])
    assert all(torch.equal(blurred[k], plain[k]) for k in plain if k != "text.tok.weight")
    assert "sign_blur" not in json.loads((tmp_path / "plain" / "run.json").read_text())  # runs of before resume

    cfg = PretrainConfig(sign_blur=0.4, sign_blur_seed=7, stages=[{"steps": 1}, {"steps": 1, "lr": 5e-4}],
                         **{k: v for k, v in tiny.items() if k != "steps"})
    final = pretrain(cfg, tmp_path / "staged")
    last = read_weights(tmp_path / "staged" / "stage_1" / "final" / "model.safetensors")
    got = read_weights(final / "model.safetensors")
    expect = blur_sign_tokens(last, 0.4, 7)
    assert all(torch.equal(got[k], expect[k]) for k in last)
    # stage 1 started from stage 0's unblurred weights: stage 0's sign rows after one step at a small lr
    # are far from the blurred ones
    s0 = read_weights(tmp_path / "staged" / "stage_0" / "final" / "model.safetensors")["text.tok.weight"]
    assert (last["text.tok.weight"][cb:] - s0[cb:]).abs().max() < (got["text.tok.weight"][cb:] - s0[cb:]).abs().max()
    assert json.loads((final / "config.json").read_text())["meta"]["recipe"]["sign_blur"] == 0.4
    with pytest.raises(ConfigError, match="may not set"):
        load(PretrainConfig, None, ["stages=[{steps: 1, sign_blur: 0.3}]"])
    with pytest.raises(ConfigError, match="sign_blur must be in"):
        load(PretrainConfig, None, ["sign_blur=1.5"])


def test_the_shipped_base_records_the_packaged_recipe():
    """flowopd/checkpoints/base's config.json holds configs/toy_pretrain.yaml as that recipe resolves."""
    import json

    from flowopd.backends.tiny import resolve_checkpoint
    from flowopd.config import PACKAGED_CONFIGS, build, load, to_dict
    from flowopd.trainers.pretrain import PretrainConfig

    meta = json.loads((resolve_checkpoint("base") / "config.json").read_text())["meta"]
    cfg = load(PretrainConfig, PACKAGED_CONFIGS / "toy_pretrain.yaml", [])
    assert set(meta["recipe"]) == set(to_dict(cfg))
    assert to_dict(build(PretrainConfig, meta["recipe"])) == to_dict(cfg)
    assert meta["step"] == sum(st["steps"] for st in cfg.stages)
