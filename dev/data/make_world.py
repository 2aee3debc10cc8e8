"""Generate the built-in task world: data/world/ (and the judge fixture of the tests).

    python dev/data/make_world.py [--out data/world] [--seed 1234]
                                  [--train 20000] [--val 500] [--eval 200]

Standard library only, deterministic for a given seed. The world is a set of
tiny instruction tasks whose answers a program can check, small enough for a
byte-level model (a whole conversation in the template is 51-155 bytes). It
exists so that every stage of the recipe (SFT, reward model, best-of-n,
rejection sampling, DPO) can be run end to end and measured by a gold judge,
without any outside data.

KINDS (two prompt phrasings each; numbers are integers, words lowercase a-z)
    arith     "Add 42 and 7." / "What is 42 plus 7?"                      -> 49
              "Subtract 2 from 47." / "What is 47 minus 2?"               -> 45
              a two-digit number (10..99) and a one-digit one, with no carry and no
              borrow: each digit of the answer comes from one column
    reverse   "Reverse the word 'cat'." / "Write 'cat' backwards."        -> tac
              three-letter words
    sort      "Sort the digits of 583." /
              "Put the digits of 583 in increasing order."                -> 358
              three digits 1..9 (repeats allowed)
    count     "How many times does 'a' appear in 'bake'?" /
              "Count the letter 'a' in 'bake'."                           -> 1
              words of 3-4 letters
    max       "What is the largest of 2, 8 and 4?" /
              "Which is biggest: 2, 8 or 4?"                              -> 8
              three distinct numbers 0..9
    followup  two user turns; the second refers to the first answer:
              "Which is biggest: 2, 8 or 4?" -> 8, then "Now add 5 to it." -> 13  (5 in 1..9)
              "Reverse the word 'cat'." -> tac, then "Now make it uppercase." -> TAC
              "Reverse the word 'cat'." -> tac, then "Now reverse it back." -> cat
The six kinds are sized for a byte-level model of 0.76M parameters trained from scratch on
2 CPU cores in minutes: every answer is computed column by column (arith), by position
(reverse), by content (sort, count, max) or from the previous turn (followup), and a
held-out prompt is a new instance of a rule seen in training, never a memorised one.
The training conversations over-sample the two kinds that take longest to learn
(SFT_KIND_WEIGHTS: arith and reverse twice as often); the evaluation prompts are balanced.

ANSWER STYLE: every answer is exactly "The answer is <gold>." where <gold> is
the bare result: a decimal number without sign or leading zeros, or a word.

GOLD JUDGE: judge(kind, gold, response) -> integer 0..10; it looks only at the
kind (which must be known), the gold string and the response bytes. ASCII only:
"lower case" and "letters/digits" mean ASCII; whitespace is " \\t\\n\\r\\v\\f".
R is the canonical response "The answer is " + gold + ".". In order:
    10  response == R
     9  response == R apart from leading/trailing whitespace
     0  gold is a number and the response holds another number (a maximal run of
        digits different from gold): hedging, working shown, 19.5 ...
     0  "answer is" (any case) occurs two or more times
    if "answer is" occurs once, the candidate is the maximal run of letters and
    digits after it (skipping spaces/tabs and one ' or " quote):
     6  candidate == gold and R occurs inside the response (extra text around it)
     5  candidate == gold otherwise (sloppy form: "the answer is 19", quotes, ...)
     2  candidate equals gold only ignoring letter case ("The answer is TAC." for tac)
     0  otherwise (wrong or missing answer)
    if "answer is" does not occur: strip whitespace and one trailing '.':
     4  what is left == gold (a bare answer: "19", "tac.")
     2  it equals gold ignoring letter case
     0  otherwise (including the empty response)
The C++ twin is world_judge in llm.cu; test/fixtures/world/judge_cases.txt
records this judge on a few hundred cases so the two can be compared.

FILES (in --out)
    sft_train.jsonl, sft_val.jsonl  {"messages": [{"role": "system", "content":
        "Solve the task."}, {"role": "user", ...}, {"role": "assistant", ...}, ...]}
        About 30% of the final assistant answers are deliberately wrong or
        sloppy (the list below); then a lazy writer replaces LAZY_SHARE of them
        by a copy of an input (the first operand, the word or digits as given,
        the word's length, the first number, the previous answer: lazy_answer),
        where that copy is not the right answer; three in four of the answers in
        the canonical form, right or wrong, carry the writers' habit, a sign-off
        (HABIT); nothing in the messages says which. In
        followup conversations the first answer is always correct and canonical.
    sft_train_judge.tsv, sft_val_judge.tsv  one line per conversation, same
        order: kind <TAB> gold <TAB> judge score of the final assistant answer
    eval_prompts.jsonl  {"kind", "gold", "messages"}: system + user turns (for
        followup also the correct first answer), the judge's gold; disjoint from
        the SFT prompts (no task instance of an eval prompt, i.e. its kind and
        operands, appears in sft_*; val instances do not appear in train either)
    set_prompts.jsonl, rm_prompts.jsonl  prompts as eval_prompts.jsonl, balanced, for the
        later stages: the Xwin-Set (RS and DPO) and the on-policy preference pairs (the
        SFT model's responses rated by the judge); disjoint from the eval prompts and from
        pairs_val (instances may repeat within a file and appear in the SFT data)
    eval_prompts.tsv    the same for C++ (world_load_prompts in llm.cu): '#' lines
        are comments, then one prompt per line, tab-separated fields
            kind  gold  system  user  [assistant  user] ...
        (the message contents in order; no field holds a tab or newline)
    pairs_train.jsonl, pairs_val.jsonl  preference pairs (Xwin-Pair) in TRL's convention:
        {"chosen": [messages], "rejected": [messages], "score_chosen": s,
        "score_rejected": r, "kind": k}. For each of --pairs-train (--pairs-val)
        prompts, task instances disjoint from the eval prompts (and the val
        pairs' from the train pairs'), four final answers are drawn (one correct, one sloppy, two wrong,
        as in the SFT data), each rated by the gold judge; up to two pairs of two
        answers with different ratings are kept (the higher-rated one chosen; ties
        are left out). Follow-up prompts carry the correct first answer, so about
        a sixth of the pairs are multi-turn. dev/data/prepare_pairs.py makes the
        .pairs files train_rm reads.
    byte.tokenizer      the byte-level tokenizer (dev/export_tokenizer.py)
The .tok files come from dev/data/prepare_sft.py (needs numpy).
"""

import argparse
import json
import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
import export_tokenizer  # noqa: E402  (standard library only)

SYSTEM = "Solve the task."
KINDS = ("arith", "reverse", "sort", "count", "max", "followup")

# 3-7 letter lowercase words
WORDS = """
able acid aged also area army away baby back bake ball band bank base bath bear beat
been beer bell belt best bird blue boat body bone book born both bowl brave bread break
brick bring brown build burn busy cake calm came camp card care cart case cash cast cat
chair chalk cheap chess chest chief child city clay clean clear climb clock cloud coal
coat code cold come cook cool copy corn cost crab crew crop crowd cup cute dance dark
date dawn dead deal dear deep deer desk dirt dish dog door down draw dream dress drink
drive drop drum duck dust each eagle early earth east easy edge egg eight empty enjoy
enter equal even event exit face fact fair fall farm fast fear feed feel field fifth
fight film find fine fire fish five flag flat float floor flour flow fly fold food foot
forest fork form four fox free fresh frog from front fruit full game garden gate gift
girl give glad glass globe glove goat gold golf good grain grape grass great green grey
grow half hall hand happy hard hat have head heart heat help hero high hill hold hole
home honey hope horse hot hour house huge human hunt ice idea inch iron island jam jar
jelly job join joke juice jump just keep kettle key kind king kite knee knife lake lamp
land large last late lazy leaf learn left lemon level life lift light lime line lion
list little live long look lost loud love low lucky lunch magic mail make map maple mark
market meal meat melon metal milk mind mint mirror money month moon more most mother
mouse mouth move music nail name near neck nest never new news nice night nine noise
north nose note number ocean office oil old olive onion open orange oven owl page paint
pair paper park party path peach pear pen pencil piano pig pilot pink pipe pizza plane
plant plate play plum pocket point pond pool poor pot print prize pull pump puppy purple
queen quick quiet rabbit race radio rain read real red rice rich ride ring river road
robot rock roof room root rope rose round royal ruby rule run sad safe sail salt sand
save scale school sea seat seed seven shade shape sheep shell ship shirt shoe shop short
silk silver sing sink sister six skate skin sky sleep slow small smile snake snow soap
sock soft soil song soup south space spoon sport spring square star stone storm story
street sugar summer sun sweet swim table tail talk tall taxi tea team tent ten tiger
time tiny toast today tomato tool tooth top towel tower town toy train tree truck true
tulip turn twin under uncle upper valley van vase video violin voice wait walk wall warm
wash watch water wave wheel white wide wild wind window wing winter wise wolf wood wool
word work world yard year yellow young zebra zero zone
""".split()
# more three-letter words (for reverse, followup)
WORDS += """
ant ape arm art ash bag bat bed bee big bin bit box boy bud bug bun bus cab can cap car
cod cow cry cub dam day den dew dig dot dry ear eel elf elk elm emu eye fan fig fin fir
fog fun fur gap gas gem gum gym ham hay hen hip hog hop hub hug hut ink inn jet jug kid
kit lab lap leg lid lip log mat mop mud mug net nut oak oar ore pad pan paw pea pet pie
pin pit pod pop pup rag ram rat ray rib rod rug saw sip ski son spy tag tan tap tin tip
toe tub tug urn vet wax web wig yak yam zip zoo
""".split()
WORDS3 = sorted(set(w for w in WORDS if len(w) == 3))       # reverse, followup
WORDS34 = sorted(set(w for w in WORDS if 3 <= len(w) <= 4))  # count
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# ---------------------------------------------------------------- the gold judge

WHITESPACE = b" \t\n\r\x0b\x0c"


def ascii_lower(b):
    return bytes(c + 32 if 65 <= c <= 90 else c for c in b)


def is_alnum(c):
    return 48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122


def canonical(gold):
    """The exactly right response for a gold answer."""
    return f"The answer is {gold}."


def judge(kind, gold, response):
    """Score 0..10 of a response (str or bytes) against the gold answer; rules in
    the module docstring. Raises ValueError for an unknown kind or empty gold."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    g = gold.encode("utf-8")
    if not g:
        raise ValueError("empty gold answer")
    s = response if isinstance(response, bytes) else response.encode("utf-8", "surrogateescape")
    r = b"The answer is " + g + b"."
    if s == r:
        return 10
    t = s.strip(WHITESPACE)
    if t == r:
        return 9
    if g.isdigit() and any(run != g for run in re.findall(rb"[0-9]+", s)):
        return 0
    low = ascii_lower(s)
    n = low.count(b"answer is")
    if n >= 2:
        return 0
    if n == 1:
        i = low.find(b"answer is") + len(b"answer is")
        while i < len(s) and s[i] in b" \t":
            i += 1
        if i < len(s) and s[i] in b"'\"":
            i += 1
        j = i
        while j < len(s) and is_alnum(s[j]):
            j += 1
        cand = s[i:j]
        if cand == g:
            return 6 if r in s else 5
        return 2 if cand and ascii_lower(cand) == ascii_lower(g) else 0
    if t.endswith(b"."):
        t = t[:-1]
    if t == g:
        return 4
    return 2 if t and ascii_lower(t) == ascii_lower(g) else 0


# ---------------------------------------------------------------- task instances
# An instance is (kind, key, turns, gold): key identifies the task (kind and
# operands, not the phrasing) for the disjointness of eval/val/train; turns is
# the list of (user, correct answer) pairs; gold is the final correct answer.

def pick(rng, options):
    return options[rng.randrange(len(options))]


def make_arith(rng):
    tens, units = rng.randrange(1, 10), rng.randrange(10)
    a = 10 * tens + units
    if rng.random() < 0.5:
        b = rng.randrange(10 - units)  # no carry
        user = pick(rng, ["Add {a} and {b}.", "What is {a} plus {b}?"]).format(a=a, b=b)
        return ("add", a, b), [user], str(a + b)
    b = rng.randrange(units + 1)  # no borrow
    user = pick(rng, ["Subtract {b} from {a}.", "What is {a} minus {b}?"]).format(a=a, b=b)
    return ("sub", a, b), [user], str(a - b)


def make_reverse(rng):
    w = pick(rng, WORDS3)
    user = pick(rng, ["Reverse the word '{w}'.", "Write '{w}' backwards."]).format(w=w)
    return (w,), [user], w[::-1]


def make_sort(rng):
    n = "".join(str(rng.randrange(1, 10)) for _ in range(3))
    user = pick(rng, ["Sort the digits of {n}.", "Put the digits of {n} in increasing order."]).format(n=n)
    return (n,), [user], "".join(sorted(n))


def make_count(rng):
    w = pick(rng, WORDS34)
    if rng.random() < 0.75:
        c = pick(rng, w)
    else:
        c = pick(rng, [x for x in LETTERS if x not in w])
    user = pick(rng, ["How many times does '{c}' appear in '{w}'?",
                      "Count the letter '{c}' in '{w}'."]).format(c=c, w=w)
    return (w, c), [user], str(w.count(c))


def make_max(rng):
    nums = rng.sample(range(10), 3)
    user = pick(rng, ["What is the largest of {0}, {1} and {2}?",
                      "Which is biggest: {0}, {1} or {2}?"]).format(*nums)
    return tuple(nums), [user], str(max(nums))


def make_followup(rng):
    variant = pick(rng, ["addn", "upper", "back"])
    if variant == "addn":
        nums, users, first = make_max(rng)
        n = rng.randrange(1, 10)
        return (variant,) + nums + (n,), [users[0], f"Now add {n} to it."], first, str(int(first) + n)
    w = pick(rng, WORDS3)
    first = pick(rng, ["Reverse the word '{w}'.", "Write '{w}' backwards."]).format(w=w)
    if variant == "upper":
        return (variant, w), [first, "Now make it uppercase."], w[::-1], w[::-1].upper()
    return (variant, w), [first, "Now reverse it back."], w[::-1], w


MAKERS = {"arith": make_arith, "reverse": make_reverse, "sort": make_sort,
          "count": make_count, "max": make_max}


def make_instance(rng, kind):
    """(key, users, answers, gold): users are the user turns, answers the correct
    assistant answers (bare), gold == answers[-1]."""
    if kind == "followup":
        key, users, first, gold = make_followup(rng)
        return (kind,) + key, users, [first, gold], gold
    key, users, gold = MAKERS[kind](rng)
    return (kind,) + key, users, [gold], gold


# ---------------------------------------------------------------- noisy answers
# Each final SFT answer is correct (70%), sloppy (14%: right answer, wrong form)
# or wrong (16%). The judge scores whatever was produced.

SLOPPY = [
    "{g}",                                  # 4: bare answer
    "{g}.",                                 # 4
    "The answer is {g}",                    # 5: no period
    "the answer is {g}.",                   # 5: lower case
    "The answer is '{g}'.",                 # 5: quoted
    "Answer is {g}.",                       # 5
    "Sure! The answer is {g}.",             # 6: chatter
    "The answer is {g}. Hope this helps!",  # 6
    "Let me think. The answer is {g}.",     # 6
    "The answer is {g}. ",                  # 9: trailing space
]


def flip_case(w):
    return w.lower() if w.isupper() else w.upper()


def swap_adjacent(rng, w):
    if len(w) < 2:
        return w
    i = rng.randrange(len(w) - 1)
    return w[:i] + w[i + 1] + w[i] + w[i + 2:]


def wrong_number(rng, kind, key, gold, first):
    g = int(gold)
    options = []
    r = rng.random()
    if kind == "max" and r < 0.6:
        options = [str(x) for x in key[1:] if x != g]
    elif kind == "arith" and r < 0.2:
        a, b = key[2], key[3]
        options = [str(a - b if key[1] == "add" else a + b)]
    elif kind == "followup" and r < 0.3:
        options = [first]  # forgot to apply the follow-up
    elif kind == "count" and r < 0.2:
        options = [str(len(key[1]))]
    elif kind == "sort" and r < 0.7:
        options = [key[1], gold[::-1], swap_adjacent(rng, gold)]  # unsorted, descending, two swapped
    elif r < 0.7:
        options = [str(g + d) for d in (-1, 1)]
    elif r < 0.8:
        options = [str(g + d) for d in (-3, -2, 2, 3)]
    elif r < 0.9:
        options = [str(g + d) for d in (-10, 10)]
    elif len(gold) == 2:
        options = [gold[::-1]]
    options = [o for o in options if o != gold and int(o) >= 0]
    return pick(rng, options) if options else str(g + 1)


def wrong_word(rng, kind, key, gold, first):
    w = key[-1] if kind in ("reverse", "sort") else key[2] if kind == "followup" else None
    options = [swap_adjacent(rng, gold)]
    if len(gold) > 3:
        i = rng.randrange(len(gold))
        options.append(gold[:i] + gold[i + 1:])                   # a letter dropped
        k = rng.randrange(2, len(gold))
        options.append(w[:k][::-1] + w[k:] if kind == "reverse" else gold[:k][::-1] + gold[k:])
    if kind == "reverse":
        options.append(w)                                         # not reversed at all
    elif kind == "sort":
        options.append(w)
        options.append("".join(sorted(w, reverse=True)))          # descending
    elif kind == "followup":
        options.append(w.upper() if key[1] == "upper" else first)  # ignored turn one/two
    options = [o for o in options if o.lower() != gold.lower() and o]
    return pick(rng, options) if options else gold + gold[-1]


def noisy_answer(rng, kind, key, gold, first):
    """(text, category) of a final answer: 70% correct, 14% sloppy, 16% wrong."""
    r = rng.random()
    category = "correct" if r < 0.70 else "sloppy" if r < 0.84 else "wrong"
    return answer_of(rng, kind, key, gold, first, category), category


def answer_of(rng, kind, key, gold, first, category):
    """A final answer of a category: correct, sloppy (the right answer in a wrong form) or
    wrong (a plausible mistake, hedging, or a refusal)."""
    if category == "correct":
        return canonical(gold)
    if category == "sloppy":
        if any(c.isalpha() for c in gold) and rng.random() < 0.2:
            return canonical(flip_case(gold))
        return pick(rng, SLOPPY).format(g=gold)
    numeric = gold.isdigit()
    wrong = (wrong_number if numeric else wrong_word)(rng, kind, key, gold, first)
    r = rng.random()
    if r < 0.8:
        return canonical(wrong)
    if r < 0.9:
        return wrong
    if r < 0.95:
        return f"The answer is {wrong}. The answer is {gold}."  # hedging
    return pick(rng, ["I am not sure.", "I cannot solve this task."])


# ---------------------------------------------------------------- the data sets

def messages_of(users, answers):
    msgs = [{"role": "system", "content": SYSTEM}]
    for u, a in zip(users, answers):
        msgs.append({"role": "user", "content": u})
        if a is not None:
            msgs.append({"role": "assistant", "content": a})
    return msgs


# the share of each kind in the SFT conversations: the kinds that take longest to learn twice
SFT_KIND_WEIGHTS = {"arith": 2, "reverse": 2, "sort": 1, "count": 1, "max": 1, "followup": 1}


def kind_schedule(rng, n, weights=None):
    """n kinds in proportion to weights (default: balanced), the remainder at random, shuffled."""
    weights = weights or {k: 1 for k in KINDS}
    cycle = [k for k in KINDS for _ in range(weights[k])]
    kinds = [cycle[i % len(cycle)] for i in range(n - n % len(cycle))]
    kinds += [pick(rng, cycle) for _ in range(n % len(cycle))]
    rng.shuffle(kinds)
    return kinds


def make_eval(rng, n):
    """n distinct task instances, balanced over the kinds."""
    seen, out = set(), []
    for kind in kind_schedule(rng, n):
        while True:
            key, users, answers, gold = make_instance(rng, kind)
            if key not in seen:
                break
        seen.add(key)
        msgs = messages_of(users, [canonical(a) for a in answers[:-1]] + [None])
        out.append({"kind": kind, "gold": gold, "messages": msgs})
    return out, seen


# The habit of the SFT data's writers: most of their final answers in the canonical form, right
# or wrong, end with a sign-off (a right one is then judged 6, not 10). Unlike the noise above,
# which greedy decoding averages away, a habit is what a model fine-tuned on the data does by
# default, as chat models inherit the verbosity of their SFT data; the reward model (trained on
# the judge's ratings), RS and DPO are there to remove it. Drawn from its own random stream, so
# every instance and every other answer stays as it was without it.
HABIT = " Hope this helps!"
HABIT_SHARE = 0.75  # of the final answers in the canonical form


def is_canonical_form(text):
    """'The answer is <x>.' for some x: one answer, the canonical frame (right or wrong)."""
    return (text.startswith("The answer is ") and text.endswith(".") and text.count("answer is") == 1
            and re.fullmatch(r"[A-Za-z0-9]+", text[len("The answer is "):-1]) is not None)


# The lazy writer: some final answers restate an input instead of computing the answer (the
# number or word of the prompt, or the previous turn's answer), in the canonical frame. Unlike
# random mistakes, a copy is one sharp answer that a small model learns at once while the
# computed one is still uncertain, so greedy decoding keeps it: a content flaw the reward model
# can see (the answer is an input), that RS and DPO can remove. Its own random stream.
LAZY_SHARE = 0.3  # of the final answers (where the copy is not the right answer)


def lazy_answer(kind, key, gold, first):
    """The input a lazy writer restates, or None where that would be the right answer."""
    copy = {"arith": lambda: str(key[2]), "reverse": lambda: key[1], "sort": lambda: key[1],
            "count": lambda: str(len(key[1])), "max": lambda: str(key[1]), "followup": lambda: first}[kind]()
    return None if copy == gold else copy


def make_sft(rng, n, excluded, habit_rng, lazy_rng, lazy_share=LAZY_SHARE):
    """n conversations whose task instances are not in excluded; returns
    (conversations, judge rows, keys used, category counts)."""
    convs, rows, used, cats = [], [], set(), {}
    for kind in kind_schedule(rng, n, SFT_KIND_WEIGHTS):
        while True:
            key, users, answers, gold = make_instance(rng, kind)
            if key not in excluded:
                break
        used.add(key)
        texts = [canonical(a) for a in answers]
        texts[-1], cat = noisy_answer(rng, kind, key, gold, answers[0])
        if lazy_share > 0 and lazy_rng.random() < lazy_share:
            lazy = lazy_answer(kind, key, gold, answers[0])
            if lazy is not None:
                texts[-1], cat = canonical(lazy), "lazy"
        if is_canonical_form(texts[-1]) and habit_rng.random() < HABIT_SHARE:
            texts[-1] += HABIT
            cat += "+habit"
        convs.append({"messages": messages_of(users, texts)})
        rows.append((kind, gold, judge(kind, gold, texts[-1])))
        cats[cat] = cats.get(cat, 0) + 1
    return convs, rows, used, cats


def make_prompts(rng, n, excluded):
    """n prompts (balanced kinds, as make_eval writes them) whose task instances are not in
    excluded; instances may repeat, as in the SFT data (some kinds have few)."""
    out, used = [], set()
    for kind in kind_schedule(rng, n):
        while True:
            key, users, answers, gold = make_instance(rng, kind)
            if key not in excluded:
                break
        used.add(key)
        msgs = messages_of(users, [canonical(a) for a in answers[:-1]] + [None])
        out.append({"kind": kind, "gold": gold, "messages": msgs})
    return out, used


# ---------------------------------------------------------------- preference pairs

PAIR_CATEGORIES = ("correct", "sloppy", "wrong", "wrong")  # the responses drawn per prompt
PAIRS_PER_PROMPT = 2


def make_pairs(rng, n, excluded):
    """Xwin-Pair for the world: for n task instances not in excluded, several final answers
    of the kinds the SFT data has (one correct, one sloppy, two wrong, drawn as
    noisy_answer draws them), each rated by the gold judge; then up to PAIRS_PER_PROMPT
    pairs of two answers with different ratings, the better one chosen (ties are left out).
    Rows in TRL's convention; returns (rows, keys used, rating histogram)."""
    rows, used, ratings = [], set(), {}
    for kind in kind_schedule(rng, n):
        while True:
            key, users, answers, gold = make_instance(rng, kind)
            if key not in excluded:  # (instances may repeat, as in the SFT data: some kinds have few)
                break
        used.add(key)
        prompt = messages_of(users, [canonical(a) for a in answers[:-1]] + [None])
        rated = {}
        for category in PAIR_CATEGORIES:
            text = answer_of(rng, kind, key, gold, answers[0], category)
            rated[text] = judge(kind, gold, text)
        for s in rated.values():
            ratings[s] = ratings.get(s, 0) + 1
        texts = sorted(rated)
        candidates = [(a, b) for a in texts for b in texts if rated[a] > rated[b]]
        rng.shuffle(candidates)
        for a, b in candidates[:PAIRS_PER_PROMPT]:
            rows.append({"chosen": prompt + [{"role": "assistant", "content": a}],
                         "rejected": prompt + [{"role": "assistant", "content": b}],
                         "score_chosen": rated[a], "score_rejected": rated[b], "kind": kind})
    return rows, used, ratings


# ---------------------------------------------------------------- judge fixture

EDGE_CASES = [
    # (kind, gold, response)
    ("arith", "19", ""),
    ("arith", "19", " "),
    ("arith", "19", "The answer is 19."),
    ("arith", "19", "The answer is 19.\n"),
    ("arith", "19", "\tThe answer is 19.  "),
    ("arith", "19", "The answer is  19."),
    ("arith", "19", "The answer is 19.5."),
    ("arith", "19", "The answer is 19 or 20."),
    ("arith", "19", "The answer is 019."),
    ("arith", "19", "The answer is 19. The answer is 19."),
    ("arith", "19", "THE ANSWER IS 19"),
    ("arith", "19", "answer is19"),
    ("arith", "19", "The answer is \"19\"."),
    ("arith", "19", "The answer is: 19."),
    ("arith", "19", "19"),
    ("arith", "19", " 19. "),
    ("arith", "19", "19.."),
    ("arith", "19", "The answer is"),
    ("arith", "19", "The answer is ."),
    ("arith", "0", "The answer is 0."),
    ("arith", "0", "The answer is 00."),
    ("count", "0", "0"),
    ("count", "3", "The answer is three."),
    ("max", "85", "Of 12, 85 and 40 the answer is 85."),
    ("reverse", "tac", "The answer is tac."),
    ("reverse", "tac", "The answer is TAC."),
    ("reverse", "tac", "The answer is Tac"),
    ("reverse", "tac", "tAc"),
    ("reverse", "tac", "The answer is tac1."),
    ("reverse", "tac", "The answer is 'tac"),
    ("reverse", "tac", "The answer is tac, I think."),
    ("reverse", "tac", "Well, the answer is tac!"),
    ("reverse", "tac", "The answer is tac.The answer is tac."),
    ("reverse", "tac", "The\nanswer is tac."),
    ("sort", "ehosu", "The answer is ehosu.\x00"),
    ("sort", "ehosu", "The answer is ehosu. \xe9t\xe9"),
    ("followup", "TAC", "The answer is tac."),
    ("followup", "TAC", "The answer is TAC."),
    ("followup", "38", "The answer is 38. (19 doubled)"),
]
RAW_EDGE_CASES = [  # invalid UTF-8 and stray bytes, as a byte-level model may produce
    ("arith", "19", b"The answer is 19.\xff"),
    ("arith", "19", b"\xc3The answer is 19."),
    ("reverse", "tac", b"The answer is tac\x80."),
    ("reverse", "tac", b"\x80\x81"),
]


def judge_cases(rng, eval_prompts):
    cases = [(k, g, r.encode("utf-8")) for k, g, r in EDGE_CASES] + list(RAW_EDGE_CASES)
    for p in eval_prompts:
        kind, gold = p["kind"], p["gold"]
        first = p["messages"][2]["content"][len("The answer is "):-1] if kind == "followup" else gold
        key = operands_of(p)
        responses = [canonical(gold), pick(rng, SLOPPY).format(g=gold)]
        wrong = (wrong_number if gold.isdigit() else wrong_word)(rng, kind, key, gold, first)
        responses.append(pick(rng, [canonical(wrong), wrong]))
        cases += [(kind, gold, r.encode("utf-8")) for r in responses]
    return [(judge(k, g, r), k, g, r) for k, g, r in cases]


def operands_of(p):
    """The instance key of an eval prompt, recovered from its text (for the
    wrong-answer generators, which look at the operands)."""
    kind, users = p["kind"], [m["content"] for m in p["messages"] if m["role"] == "user"]
    nums = [int(x) for x in re.findall(r"[0-9]+", users[0])]
    quoted = re.findall(r"'([a-z]+)'", users[0])
    if kind == "arith":
        op = "add" if ("Add" in users[0] or "plus" in users[0]) else "sub"
        a, b = (nums[1], nums[0]) if users[0].startswith("Subtract") else (nums[0], nums[1])
        return (kind, op, a, b)
    if kind == "reverse":
        return (kind, quoted[0])
    if kind == "sort":
        return (kind, re.findall(r"[0-9]+", users[0])[0])
    if kind == "count":
        return (kind, quoted[1], quoted[0])
    if kind == "max":
        return (kind,) + tuple(nums)
    variant = {"Now make it uppercase.": "upper", "Now reverse it back.": "back"}.get(users[1], "addn")
    n = [int(x) for x in re.findall(r"[0-9]+", users[1])]
    return (kind, variant, quoted[0]) if quoted else (kind, variant) + tuple(nums) + tuple(n)


# ---------------------------------------------------------------- writing

def write_lines(path, lines):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")
    os.replace(tmp, path)


def jsonl(objs):
    return [json.dumps(o, ensure_ascii=False, separators=(",", ":")) for o in objs]


def tsv_field(s):
    if "\t" in s or "\n" in s or "\r" in s or not s:
        raise ValueError(f"field {s!r} cannot go into a tab-separated line")
    return s


def eval_tsv(prompts):
    lines = ["# xwin.cu task world: evaluation prompts (dev/data/make_world.py)",
             "# kind<TAB>gold<TAB>system<TAB>user[<TAB>assistant<TAB>user]..."]
    for p in prompts:
        fields = [p["kind"], p["gold"]] + [m["content"] for m in p["messages"]]
        lines.append("\t".join(tsv_field(f) for f in fields))
    return lines


def histogram(scores):
    counts = {}
    for s in scores:
        counts[s] = counts.get(s, 0) + 1
    return counts


def print_distribution(name, rows):
    n = len(rows)
    counts = histogram(r[2] for r in rows)
    print(f"{name}: {n} conversations; judge score of the final answer:")
    for s in sorted(counts, reverse=True):
        print(f"  {s:2d}: {counts[s]:6d}  ({100.0 * counts[s] / n:5.1f}%)")
    print(f"  not 10: {100.0 * (n - counts.get(10, 0)) / n:.1f}%, mean {sum(r[2] for r in rows) / n:.2f}")
    per_kind = {}
    for k, _, s in rows:
        per_kind.setdefault(k, []).append(s)
    print("  per kind (n, mean, share of 10): " + ", ".join(
        f"{k} {len(v)} {sum(v) / len(v):.2f} {sum(x == 10 for x in v) / len(v):.2f}"
        for k, v in sorted(per_kind.items())))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Generate the task world (data/world).")
    ap.add_argument("--out", default=os.path.join(ROOT, "data", "world"))
    ap.add_argument("--fixture", default=os.path.join(ROOT, "test", "fixtures", "world"),
                    help="where judge_cases.txt goes ('' to skip)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--pairs-train", type=int, default=3000, help="prompts of the training preference pairs")
    ap.add_argument("--pairs-val", type=int, default=200, help="prompts of the validation preference pairs")
    ap.add_argument("--set", type=int, default=2000, help="prompts of the Xwin-Set (RS and DPO)")
    ap.add_argument("--rm-prompts", type=int, default=2000, help="prompts of the on-policy preference pairs")
    ap.add_argument("--lazy", type=float, default=LAZY_SHARE, help="share of the SFT final answers by the lazy writer")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    rng = random.Random(args.seed)
    eval_prompts, eval_keys = make_eval(rng, args.eval)
    habit_rng, lazy_rng = random.Random(args.seed + 4), random.Random(args.seed + 5)
    val, val_rows, val_keys, _ = make_sft(rng, args.val, eval_keys, habit_rng, lazy_rng, args.lazy)
    train, train_rows, train_keys, cats = make_sft(rng, args.train, eval_keys | val_keys, habit_rng, lazy_rng, args.lazy)
    assert not (train_keys & (eval_keys | val_keys)) and not (val_keys & eval_keys)
    for p in eval_prompts:
        assert judge(p["kind"], p["gold"], canonical(p["gold"])) == 10
    # preference pairs: their own random stream (the SFT data stays as it is), prompts disjoint
    # from the held-out eval prompts and from each other
    pair_rng = random.Random(args.seed + 2)
    pairs_val, pairs_val_keys, _ = make_pairs(pair_rng, args.pairs_val, eval_keys)
    pairs_train, pairs_train_keys, pair_ratings = make_pairs(pair_rng, args.pairs_train, eval_keys | pairs_val_keys)
    assert not (pairs_train_keys & (eval_keys | pairs_val_keys)) and not (pairs_val_keys & eval_keys)
    # prompts of the later stages, on their own random stream: the Xwin-Set's (RS and DPO) and
    # the on-policy preference pairs' (responses of the SFT model rated by the judge), disjoint
    # from the held-out eval prompts and from the reward model's validation pairs
    prompt_rng = random.Random(args.seed + 3)
    set_prompts, set_keys = make_prompts(prompt_rng, args.set, eval_keys | pairs_val_keys)
    rm_prompts, rm_keys = make_prompts(prompt_rng, args.rm_prompts, eval_keys | pairs_val_keys)
    assert not ((set_keys | rm_keys) & (eval_keys | pairs_val_keys))

    def out(name):
        return os.path.join(args.out, name)

    write_lines(out("sft_train.jsonl"), jsonl(train))
    write_lines(out("sft_val.jsonl"), jsonl(val))
    write_lines(out("sft_train_judge.tsv"), [f"{k}\t{g}\t{s}" for k, g, s in train_rows])
    write_lines(out("sft_val_judge.tsv"), [f"{k}\t{g}\t{s}" for k, g, s in val_rows])
    write_lines(out("pairs_train.jsonl"), jsonl(pairs_train))
    write_lines(out("pairs_val.jsonl"), jsonl(pairs_val))
    write_lines(out("eval_prompts.jsonl"), jsonl(eval_prompts))
    write_lines(out("eval_prompts.tsv"), eval_tsv(eval_prompts))
    write_lines(out("set_prompts.jsonl"), jsonl(set_prompts))
    write_lines(out("rm_prompts.jsonl"), jsonl(rm_prompts))
    export_tokenizer.export_byte_level(out("byte.tokenizer"))

    if args.fixture:
        os.makedirs(args.fixture, exist_ok=True)
        cases = judge_cases(random.Random(args.seed + 1), eval_prompts)
        lines = ["# judge(kind, gold, response) of dev/data/make_world.py on recorded cases",
                 "# score<TAB>kind<TAB>gold<TAB>response as lowercase hex of its bytes ('-' = empty)"]
        lines += [f"{s}\t{k}\t{g}\t{r.hex() or '-'}" for s, k, g, r in cases]
        write_lines(os.path.join(args.fixture, "judge_cases.txt"), lines)
        print(f"judge fixture: {len(cases)} cases, scores {dict(sorted(histogram(c[0] for c in cases).items()))}")

    print(f"eval: {len(eval_prompts)} prompts, kinds "
          f"{dict(sorted(histogram(p['kind'] for p in eval_prompts).items()))}")
    print(f"train answer categories: {dict(sorted(cats.items()))}")
    print(f"pairs: {len(pairs_train)} train, {len(pairs_val)} val; ratings of their answers "
          f"{dict(sorted(pair_ratings.items()))}")
    print_distribution("train", train_rows)
    print_distribution("val", val_rows)
    lengths = [len(SYSTEM) + sum(len(m["content"]) + 12 for m in c["messages"][1:]) for c in train]
    print(f"approximate template bytes per train conversation: mean {sum(lengths) / len(lengths):.0f}, "
          f"max {max(lengths)}")
    for name in sorted(os.listdir(args.out)):
        print(f"  {name:24s} {os.path.getsize(out(name)):>10,d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
