"""What the app does, as plain use cases over the core (no Gradio, no screen text).

    ws = Workspace(AppConfig.from_env())          # the store, the job runner, loaded backbones
    scope = ws.scope(project_id, owner)            # the project, access checked once
    library.add_class(scope, "scratch")
    job_id = modeling.start_training(scope, "graph")

Modules: `context` (Workspace, ProjectScope), `projects` (projects, links, examples),
`library` (classes and images), `modeling` (backbones, training, models, the knowledge graph,
evaluation, prediction, pool labeling, method settings), `exports` (labels, the labeled set,
model export and import). Front ends (fewshot_studio.ui) format what these return.
"""
from .context import ProjectScope, Workspace

__all__ = ["ProjectScope", "Workspace"]
