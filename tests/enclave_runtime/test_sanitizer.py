"""CMIF's token sanitizer: the mechanisms' distributions, ε's effect, seeds, special tokens, and the cmif policy."""

import itertools
import math

import pytest
import torch
from tiny_models import tiny_inputs, tiny_model

import secure_split
from secure_split import SplitConfig
from secure_split.enclave_runtime.sanitizer import MECHANISMS, SANITIZERS, make_token_sanitizer
from secure_split.enclave_runtime.sanitizer_custext import CusTextPlus
from secure_split.enclave_runtime.sanitizer_rnm import ReportNoisyMax
from secure_split.enclave_runtime.sanitizer_santext import SanTextPlus

VOCAB, WIDTH, SPECIAL = 300, 16, (0, 1)


@pytest.fixture(scope="module")
def table():
    return torch.randn(VOCAB, WIDTH, generator=torch.Generator().manual_seed(0))


def sanitizer(mechanism, epsilon, table, test_seed=0, **options):
    return make_token_sanitizer(mechanism, epsilon, table, k=10, test_seed=test_seed, special_ids=SPECIAL, **options)


def tokens(n, seed=1):
    """Non-special token ids."""
    return torch.randint(len(SPECIAL), VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_infinite_epsilon_returns_the_input(mechanism, table):
    ids = tokens(500).reshape(20, 25)
    assert torch.equal(sanitizer(mechanism, math.inf, table).sanitize(ids), ids)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_replacement_rate_falls_as_epsilon_grows(mechanism, table):
    ids = tokens(3000)
    rates = []
    for epsilon in (0.25, 1.0, 4.0, 16.0, 64.0, 256.0):
        s = sanitizer(mechanism, epsilon, table)
        s.sanitize(ids)
        rates.append(s.replacement_rate)
    assert all(a >= b for a, b in itertools.pairwise(rates)), rates
    assert rates[0] > 0.5 and rates[-1] < 0.05 and len(set(rates)) >= 3, rates


@pytest.mark.parametrize(("mechanism", "epsilon"), [("rnm", 12.0), ("santext+", 3.0), ("custext+", 2.0)])
def test_the_output_distribution_matches_the_mechanism(mechanism, epsilon, table):
    """20,000 draws for one token against the exact probabilities (chi-square); a wrong ε is rejected."""
    token, n = 7, 20_000
    s = sanitizer(mechanism, epsilon, table, test_seed=5)
    counts = torch.bincount(s.sanitize(torch.full((n,), token)), minlength=VOCAB).double()
    probs = s.probabilities(token)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert _p_value(counts, probs) > 1e-4
    wrong = sanitizer(mechanism, epsilon * 1.5, table).probabilities(token)
    assert _p_value(counts, wrong) < 1e-6


def _p_value(counts, probs):
    """Pearson's chi-square on the outputs expected at least 5 times (the rest pooled into one bin)."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    wanted = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = wanted > 0
    if bool(((observed > 0) & ~keep).any()):
        return 0.0  # an output the mechanism never gives
    statistic = ((observed[keep] - wanted[keep]) ** 2 / wanted[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2.0))


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_same_seed_same_output_and_specials_untouched(mechanism, table):
    ids = torch.cat([tokens(400), torch.tensor(SPECIAL)])
    a = sanitizer(mechanism, 1.0, table, test_seed=9).sanitize(ids)
    assert torch.equal(a, sanitizer(mechanism, 1.0, table, test_seed=9).sanitize(ids))
    assert not torch.equal(a, sanitizer(mechanism, 1.0, table, test_seed=10).sanitize(ids))
    assert torch.equal(a[-2:], torch.tensor(SPECIAL))  # never replaced
    assert not torch.isin(a[:-2], torch.tensor(SPECIAL)).any()  # never produced


def test_the_plus_variants_leave_their_words_alone(table):
    ids = tokens(1000)
    stop = ids[:10].unique()
    out = sanitizer("custext+", 0.5, table, stopword_ids=stop.tolist()).sanitize(ids)
    assert torch.equal(out[torch.isin(ids, stop)], ids[torch.isin(ids, stop)])
    frequent = torch.zeros(VOCAB)
    frequent[ids[0]] = 1000.0  # the only non-sensitive token (w = 0.9 of the vocabulary is sensitive)
    s = sanitizer("santext+", 0.5, table, frequencies=frequent, p=0.0)
    out = s.sanitize(ids)
    assert torch.equal(out[ids == ids[0]], ids[ids == ids[0]]) and s.replacement_rate > 0.5


def test_bad_arguments_are_refused(table):
    with pytest.raises(ValueError, match="mechanism must be one of"):
        make_token_sanitizer("laplace", 1.0, table)
    with pytest.raises(ValueError, match="epsilon must be a positive number"):
        make_token_sanitizer("rnm", 0.0, table)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 300\)"):
        sanitizer("rnm", 1.0, table).sanitize(torch.tensor([VOCAB]))
    with pytest.raises(ValueError, match="sets cmif's token sanitizer"):
        SplitConfig(epsilon=1.0)


def test_each_mechanism_has_its_class_and_takes_only_its_own_options(table):
    assert list(SANITIZERS.items()) == [("rnm", ReportNoisyMax), ("santext+", SanTextPlus), ("custext+", CusTextPlus)]
    assert MECHANISMS == ("rnm", "santext+", "custext+")
    for mechanism, cls in SANITIZERS.items():
        s = sanitizer(mechanism, 1.0, table)
        assert type(s) is cls and s.mechanism == mechanism
    with pytest.raises(ValueError, match=r"'rnm' takes the options \[\], not \['p'\]"):
        sanitizer("rnm", 1.0, table, p=0.5)
    with pytest.raises(ValueError, match=r"'custext\+' takes the options \['stopword_ids'\], not \['frequencies'\]"):
        sanitizer("custext+", 1.0, table, frequencies=torch.ones(VOCAB))
    with pytest.raises(ValueError, match="p and w must lie in"):
        sanitizer("santext+", 1.0, table, w=1.5)
    assert secure_split.make_token_sanitizer is make_token_sanitizer  # the public face builds by mechanism


def _sanitized_twice(model, config, ids):
    """What the program's own sanitizer gives on its second call (split() runs the program once to capture)."""
    s = make_token_sanitizer(config.sanitizer, config.epsilon, model.get_input_embeddings().weight,
                             config.sanitizer_k, config.test_seed, config.special_token_ids)  # fmt: skip
    s.sanitize(ids)
    return s.sanitize(ids)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_cmif_runs_the_model_on_sanitized_tokens_and_reports_epsilon(name):
    model = tiny_model(name)
    args, kwargs = tiny_inputs(name)
    program = secure_split.split(model, args, kwargs, SplitConfig(policy="cmif", epsilon=8.0, test_seed=3))
    with secure_split.trace_boundary() as trace:
        out = program(*args, **kwargs)
    clean = _sanitized_twice(model, program.config, args[0])
    assert (clean != args[0]).float().mean() > 0.3
    with torch.no_grad():
        torch.testing.assert_close(out[0], model(clean, **kwargs)[0])
        embedded = model.get_input_embeddings()(clean)
    assert any(torch.equal(c.tensor, embedded) for c in trace.to_gpu())  # the sanitized tokens' embeddings cross
    report = program.report()
    assert report.epsilon == 8.0 and report.sanitizer == "rnm" and "ε = 8 per token" in str(report)
    named = [getattr(model.config, f"{t}_token_id") for t in ("pad", "bos", "eos")]
    assert {i for i in named if i is not None} <= set(program.config.special_token_ids)


def test_cmif_bundle_sanitizes_in_the_enclave(tmp_path):
    model = tiny_model("bert")
    args, kwargs = tiny_inputs("bert")
    config = SplitConfig(policy="cmif", epsilon=4.0, sanitizer="custext+")
    root = secure_split.export_bundle(model, args, tmp_path / "b", config, kwargs)
    assert (root / "enclave" / "token_embeddings.npy").is_file()
    session = secure_split.load_bundle(root, key=f"{root}.key", test_seed=11)
    out = session(*args, **kwargs)
    loaded = session.program.config
    assert loaded.epsilon == 4.0 and loaded.sanitizer == "custext+" and loaded.special_token_ids == (0,)
    s = make_token_sanitizer("custext+", 4.0, model.get_input_embeddings().weight, 20, 11, (0,))
    with torch.no_grad():
        torch.testing.assert_close(out[0], model(s.sanitize(args[0]), **kwargs)[0], atol=1e-5, rtol=1e-5)
    plain = secure_split.load_bundle(root, key=f"{root}.key", epsilon=math.inf)(*args, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(plain[0], model(*args, **kwargs)[0], atol=1e-5, rtol=1e-5)
