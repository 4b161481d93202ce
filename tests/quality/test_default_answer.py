"""The README's question through LLM() with every default (dtype "auto": float32 for the embedded model):
greedy answer "The capital of France is Paris." (in bfloat16 the first token's near tie flipped it to "L'Étoile")."""
from yaie_jax import LLM, SamplingParams


def test_readme_question_default_settings():
    llm = LLM()
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert out.text == "The capital of France is Paris."
    assert llm.get_stats()["dtype"] == "float32" and llm.engine.requested_dtype == "auto"
