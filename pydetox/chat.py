"""`pydetox chat`: a terminal chat with a GGUF model in its own chat template (llama-cpp-python's chat completion,
streamed), optionally with a LoRA adapter or calibrator fusion at the output layer."""

from __future__ import annotations

from pathlib import Path

from pydetox.errors import PydetoxError


def chat(model: Path, *, prompt: str | None = None, max_tokens: int = 256, temperature: float = 0.7, seed: int = 0,
         n_ctx: int = 2048, calibrator: str | None = None, alpha: float = 0.4, lora: str | None = None,
         lora_scale: float = 1.0) -> int:
    """Answer `prompt` once, or read messages from the terminal until EOF or /exit; returns the exit code."""
    from pydetox.runtime import load_llama

    if lora and not Path(lora).is_file():
        raise PydetoxError(f"expected a LoRA adapter GGUF at {lora}, found nothing")
    extra = {"lora_path": str(lora), "lora_scale": lora_scale} if lora else {}
    llm = load_llama(model, n_ctx=n_ctx, seed=seed, **extra)
    processors = None
    if calibrator:
        from llama_cpp import LogitsProcessorList

        from pydetox.fusion import FusionLogitsProcessor

        processors = LogitsProcessorList([FusionLogitsProcessor(model, calibrator, alpha, n_ctx=n_ctx)])
    history: list[dict[str, str]] = []
    prompts = [prompt] if prompt else None
    while True:
        if prompts is not None:
            if not prompts:
                return 0
            user = prompts.pop()
        else:
            try:
                user = input("> ")
            except EOFError:
                return 0
            if user.strip() in ("/exit", "/quit"):
                return 0
        history.append({"role": "user", "content": user})
        reply = []
        for chunk in llm.create_chat_completion(history, max_tokens=max_tokens, temperature=temperature,
                                                stream=True, logits_processor=processors):
            piece = chunk["choices"][0]["delta"].get("content", "")
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
