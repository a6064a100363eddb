from infermesh.service import main
from router.server import RouterService
from router.settings import RouterSettings

main(lambda: RouterService(RouterSettings()))
