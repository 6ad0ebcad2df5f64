"""The model's building blocks: MoE-LoRA layers, their injection into a base model, the router, routing, experts,
the skill library, the fused loss, and the peft reference the tests compare against."""
