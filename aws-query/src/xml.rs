//! Reading the XML answers: the responses warden asks for and the error documents of
//! EC2 (`<Response><Errors><Error>`) and ELB (`<ErrorResponse><Error>`). Pure functions,
//! tested against answers in the shape the services document.

use aws_smithy_xml::decode::{try_data, Document, ScopedDecoder};

use crate::QueryError;

/// One Availability Zone and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub name: String,
    pub state: String,
}

/// What one page of DescribeInstances says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct InstancesPage {
    pub instances: usize,
    pub next_token: Option<String>,
}

fn bad(e: impl std::fmt::Display) -> QueryError {
    QueryError::Answer(e.to_string())
}

/// The zones of a DescribeAvailabilityZonesResponse.
pub(crate) fn zones(text: &str) -> Result<Vec<Zone>, QueryError> {
    let mut doc = Document::new(text);
    let mut root = doc.root_element().map_err(bad)?;
    if !root.start_el().matches("DescribeAvailabilityZonesResponse") {
        return Err(bad(format!(
            "expected DescribeAvailabilityZonesResponse, found {}",
            root.start_el().local()
        )));
    }
    let mut zones = Vec::new();
    while let Some(mut tag) = root.next_tag() {
        if tag.start_el().matches("availabilityZoneInfo") {
            while let Some(mut item) = tag.next_tag() {
                zones.push(zone(&mut item)?);
            }
        }
    }
    Ok(zones)
}

fn zone(item: &mut ScopedDecoder) -> Result<Zone, QueryError> {
    match leaves(item, ["zoneName", "zoneState"])? {
        [Some(name), Some(state)] => Ok(Zone { name, state }),
        _ => Err(bad("an availability zone without zoneName or zoneState")),
    }
}

/// The instance count and next token of a DescribeInstancesResponse page.
pub(crate) fn instances_page(text: &str) -> Result<InstancesPage, QueryError> {
    let mut doc = Document::new(text);
    let mut root = doc.root_element().map_err(bad)?;
    if !root.start_el().matches("DescribeInstancesResponse") {
        return Err(bad(format!(
            "expected DescribeInstancesResponse, found {}",
            root.start_el().local()
        )));
    }
    let mut page = InstancesPage {
        instances: 0,
        next_token: None,
    };
    while let Some(mut tag) = root.next_tag() {
        if tag.start_el().matches("reservationSet") {
            while let Some(mut reservation) = tag.next_tag() {
                while let Some(mut field) = reservation.next_tag() {
                    if field.start_el().matches("instancesSet") {
                        while let Some(_instance) = field.next_tag() {
                            page.instances += 1;
                        }
                    }
                }
            }
        } else if tag.start_el().matches("nextToken") {
            let token = try_data(&mut tag).map_err(bad)?;
            if !token.is_empty() {
                page.next_token = Some(token.into_owned());
            }
        }
    }
    Ok(page)
}

/// The error an answer with `status` says (EC2's `<Response><Errors><Error>`).
pub(crate) fn error(status: u16, text: &str) -> QueryError {
    let (code, message) = error_fields(text).unwrap_or_default();
    let code = if code.is_empty() {
        format!("HTTP {status}")
    } else {
        code
    };
    let message = if message.is_empty() {
        text.chars().take(200).collect()
    } else {
        message
    };
    QueryError::Service {
        status,
        code,
        message,
    }
}

fn error_fields(text: &str) -> Option<(String, String)> {
    let mut doc = Document::new(text);
    let mut root = doc.root_element().ok()?;
    let (mut code, mut message) = (String::new(), String::new());
    let mut read = |error: &mut ScopedDecoder| -> Result<(), QueryError> {
        let [c, m] = leaves(error, ["Code", "Message"])?;
        (code, message) = (c.unwrap_or_default(), m.unwrap_or_default());
        Ok(())
    };
    // EC2 nests its errors in <Errors>; ELB has one <Error> under the root.
    let found = if root.start_el().matches("Response") {
        walk(&mut root, &["Errors", "Error"], &mut read)
    } else {
        walk(&mut root, &["Error"], &mut read)
    };
    found.ok()?;
    Some((code, message))
}

/// The root element, checked to be `name`.
fn root_named<'i, 'a>(
    doc: &'a mut Document<'i>,
    name: &str,
) -> Result<ScopedDecoder<'i, 'a>, QueryError> {
    let root = doc.root_element().map_err(bad)?;
    if !root.start_el().matches(name) {
        return Err(bad(format!(
            "expected {name}, found {}",
            root.start_el().local()
        )));
    }
    Ok(root)
}

/// Calls `f` on every element reached from `scope` through child elements named by
/// `path` in turn (a repeated `member` at the end reaches each of them).
fn walk<'i>(
    scope: &mut ScopedDecoder<'i, '_>,
    path: &[&str],
    f: &mut dyn FnMut(&mut ScopedDecoder<'i, '_>) -> Result<(), QueryError>,
) -> Result<(), QueryError> {
    let Some((first, rest)) = path.split_first() else {
        return f(scope);
    };
    while let Some(mut child) = scope.next_tag() {
        if child.start_el().matches(first) {
            walk(&mut child, rest, f)?;
        }
    }
    Ok(())
}

/// The texts of the child elements of `scope` named by `names` (each the last of that
/// name; `None` if absent); other children are skipped.
fn leaves<const N: usize>(
    scope: &mut ScopedDecoder,
    names: [&str; N],
) -> Result<[Option<String>; N], QueryError> {
    let mut out = [const { None }; N];
    while let Some(mut field) = scope.next_tag() {
        if let Some(i) = names.iter().position(|n| field.start_el().matches(n)) {
            out[i] = Some(text_of(&mut field)?);
        }
    }
    Ok(out)
}

/// The text of a leaf element.
fn text_of(leaf: &mut ScopedDecoder) -> Result<String, QueryError> {
    Ok(try_data(leaf).map_err(bad)?.trim().to_owned())
}

/// The instance ids of the first balancer of a DescribeLoadBalancersResponse; `None` if
/// it lists none.
pub(crate) fn balancer_instances(text: &str) -> Result<Option<Vec<String>>, QueryError> {
    let mut doc = Document::new(text);
    let mut root = root_named(&mut doc, "DescribeLoadBalancersResponse")?;
    let mut balancers: Vec<Vec<String>> = Vec::new();
    let path = [
        "DescribeLoadBalancersResult",
        "LoadBalancerDescriptions",
        "member",
    ];
    walk(&mut root, &path, &mut |lb| {
        let mut ids = Vec::new();
        walk(lb, &["Instances", "member", "InstanceId"], &mut |id| {
            ids.push(text_of(id)?);
            Ok(())
        })?;
        balancers.push(ids);
        Ok(())
    })?;
    Ok(balancers.into_iter().next())
}

/// A target group: its ARN and target type (`instance`, `ip`, `lambda`, `alb`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetGroup {
    pub arn: String,
    /// Empty when the answer does not say (AWS's default is `instance`).
    pub target_type: String,
}

/// The target groups of a DescribeTargetGroupsResponse.
pub(crate) fn target_groups(text: &str) -> Result<Vec<TargetGroup>, QueryError> {
    let mut doc = Document::new(text);
    let mut root = root_named(&mut doc, "DescribeTargetGroupsResponse")?;
    let mut out = Vec::new();
    let path = ["DescribeTargetGroupsResult", "TargetGroups", "member"];
    walk(&mut root, &path, &mut |tg| {
        let [arn, target_type] = leaves(tg, ["TargetGroupArn", "TargetType"])?;
        let arn = arn
            .filter(|a| !a.is_empty())
            .ok_or_else(|| bad("a target group without TargetGroupArn"))?;
        out.push(TargetGroup {
            arn,
            target_type: target_type.unwrap_or_default(),
        });
        Ok(())
    })?;
    Ok(out)
}

/// One target of a group and its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub id: String,
    pub port: Option<u16>,
    /// `healthy`, `draining`...; empty when the answer does not say.
    pub state: String,
}

/// The targets of a DescribeTargetHealthResponse.
pub(crate) fn targets(text: &str) -> Result<Vec<Target>, QueryError> {
    let mut doc = Document::new(text);
    let mut root = root_named(&mut doc, "DescribeTargetHealthResponse")?;
    let mut out = Vec::new();
    let path = [
        "DescribeTargetHealthResult",
        "TargetHealthDescriptions",
        "member",
    ];
    walk(&mut root, &path, &mut |d| {
        let mut t = Target {
            id: String::new(),
            port: None,
            state: String::new(),
        };
        while let Some(mut part) = d.next_tag() {
            if part.start_el().matches("Target") {
                let [id, port] = leaves(&mut part, ["Id", "Port"])?;
                t.id = id.unwrap_or_default();
                t.port = port
                    .map(|p| p.parse().map_err(|_| bad(format!("port {p:?}"))))
                    .transpose()?;
            } else if part.start_el().matches("TargetHealth") {
                walk(&mut part, &["State"], &mut |st| {
                    t.state = text_of(st)?;
                    Ok(())
                })?;
            }
        }
        out.push(t);
        Ok(())
    })?;
    Ok(out)
}

/// The key and value of each attribute of a DescribeTargetGroupAttributesResponse.
pub(crate) fn attributes(text: &str) -> Result<Vec<(String, String)>, QueryError> {
    let mut doc = Document::new(text);
    let mut root = root_named(&mut doc, "DescribeTargetGroupAttributesResponse")?;
    let mut out = Vec::new();
    let path = [
        "DescribeTargetGroupAttributesResult",
        "Attributes",
        "member",
    ];
    walk(&mut root, &path, &mut |a| {
        let [key, value] = leaves(a, ["Key", "Value"])?;
        out.push((key.unwrap_or_default(), value.unwrap_or_default()));
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZONES: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeAvailabilityZonesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
   <requestId>e23c5a54-a29c-43ee-8b55-0c13example</requestId>
   <availabilityZoneInfo>
      <item>
         <zoneName>eu-west-1a</zoneName>
         <zoneState>available</zoneState>
         <regionName>eu-west-1</regionName>
         <messageSet/>
         <zoneId>euw1-az1</zoneId>
      </item>
      <item>
         <zoneName>eu-west-1b</zoneName>
         <zoneState>impaired</zoneState>
         <regionName>eu-west-1</regionName>
         <messageSet><item><message>degraded</message></item></messageSet>
      </item>
   </availabilityZoneInfo>
</DescribeAvailabilityZonesResponse>"#;

    #[test]
    fn zones_are_read_with_their_state() {
        assert_eq!(
            zones(ZONES).unwrap(),
            vec![
                Zone {
                    name: "eu-west-1a".into(),
                    state: "available".into()
                },
                Zone {
                    name: "eu-west-1b".into(),
                    state: "impaired".into()
                },
            ]
        );
    }

    #[test]
    fn instances_are_counted_across_reservations_and_the_token_is_kept() {
        let page = r#"<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>8f7724cf</requestId>
  <reservationSet>
    <item><reservationId>r-1</reservationId><groupSet/>
      <instancesSet>
        <item><instanceId>i-1</instanceId><tagSet><item><key>a</key><value>b</value></item></tagSet></item>
        <item><instanceId>i-2</instanceId></item>
      </instancesSet>
    </item>
    <item><reservationId>r-2</reservationId>
      <instancesSet><item><instanceId>i-3</instanceId><blockDeviceMapping><item/></blockDeviceMapping></item></instancesSet>
    </item>
  </reservationSet>
  <nextToken>abc==</nextToken>
</DescribeInstancesResponse>"#;
        assert_eq!(
            instances_page(page).unwrap(),
            InstancesPage {
                instances: 3,
                next_token: Some("abc==".into())
            }
        );
        let last = r#"<DescribeInstancesResponse><reservationSet/></DescribeInstancesResponse>"#;
        assert_eq!(
            instances_page(last).unwrap(),
            InstancesPage {
                instances: 0,
                next_token: None
            }
        );
    }

    #[test]
    fn an_error_document_gives_its_code_and_message() {
        let text = r#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>ea96</RequestID></Response>"#;
        match error(503, text) {
            QueryError::Service {
                status,
                code,
                message,
            } => {
                assert_eq!(
                    (status, code.as_str(), message.as_str()),
                    (503, "RequestLimitExceeded", "Request limit exceeded.")
                );
            }
            other => panic!("{other:?}"),
        }
        // Not XML (a proxy's page): the status names it.
        match error(502, "<html>bad gateway</html>") {
            QueryError::Service { code, .. } => assert_eq!(code, "HTTP 502"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn another_answer_is_refused_with_its_name() {
        let e = zones("<DescribeInstancesResponse/>").unwrap_err();
        assert!(e.to_string().contains("DescribeInstancesResponse"), "{e}");
    }

    #[test]
    fn an_elb_error_document_gives_its_code_and_message() {
        let text = r#"<ErrorResponse xmlns="http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/">
  <Error><Type>Sender</Type><Code>TargetGroupNotFound</Code><Message>One or more target groups not found</Message></Error>
  <RequestId>8a1b</RequestId>
</ErrorResponse>"#;
        match error(400, text) {
            QueryError::Service { code, message, .. } => {
                assert_eq!(code, "TargetGroupNotFound");
                assert_eq!(message, "One or more target groups not found");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_balancers_instances_are_its_own_not_another_lists() {
        let text = r#"<DescribeLoadBalancersResponse xmlns="http://elasticloadbalancing.amazonaws.com/doc/2012-06-01/">
  <DescribeLoadBalancersResult>
    <LoadBalancerDescriptions>
      <member>
        <LoadBalancerName>web</LoadBalancerName>
        <ListenerDescriptions><member><Listener><InstancePort>80</InstancePort></Listener></member></ListenerDescriptions>
        <Instances>
          <member><InstanceId>i-1</InstanceId></member>
          <member><InstanceId>i-2</InstanceId></member>
        </Instances>
        <AvailabilityZones><member>eu-west-1a</member></AvailabilityZones>
      </member>
    </LoadBalancerDescriptions>
  </DescribeLoadBalancersResult>
  <ResponseMetadata><RequestId>83c88b9d</RequestId></ResponseMetadata>
</DescribeLoadBalancersResponse>"#;
        assert_eq!(
            balancer_instances(text).unwrap(),
            Some(vec!["i-1".to_owned(), "i-2".to_owned()])
        );
        let none = "<DescribeLoadBalancersResponse><DescribeLoadBalancersResult><LoadBalancerDescriptions/></DescribeLoadBalancersResult></DescribeLoadBalancersResponse>";
        assert_eq!(balancer_instances(none).unwrap(), None);
        let empty = "<DescribeLoadBalancersResponse><DescribeLoadBalancersResult><LoadBalancerDescriptions><member><Instances/></member></LoadBalancerDescriptions></DescribeLoadBalancersResult></DescribeLoadBalancersResponse>";
        assert_eq!(balancer_instances(empty).unwrap(), Some(vec![]));
    }

    #[test]
    fn target_groups_targets_and_attributes_are_read() {
        let groups = r#"<DescribeTargetGroupsResponse><DescribeTargetGroupsResult><TargetGroups>
  <member><TargetGroupArn>arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/web/73e2</TargetGroupArn>
    <TargetGroupName>web</TargetGroupName><Port>80</Port><TargetType>ip</TargetType>
    <LoadBalancerArns><member>arn:lb</member></LoadBalancerArns></member>
</TargetGroups></DescribeTargetGroupsResult></DescribeTargetGroupsResponse>"#;
        assert_eq!(
            target_groups(groups).unwrap(),
            vec![TargetGroup {
                arn: "arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/web/73e2".into(),
                target_type: "ip".into()
            }]
        );
        let health = r#"<DescribeTargetHealthResponse><DescribeTargetHealthResult><TargetHealthDescriptions>
  <member><HealthCheckPort>80</HealthCheckPort><Target><Port>8001</Port><Id>i-1</Id></Target>
    <TargetHealth><State>healthy</State></TargetHealth></member>
  <member><Target><Id>10.0.0.2</Id></Target>
    <TargetHealth><State>draining</State><Reason>Target.DeregistrationInProgress</Reason></TargetHealth></member>
</TargetHealthDescriptions></DescribeTargetHealthResult></DescribeTargetHealthResponse>"#;
        assert_eq!(
            targets(health).unwrap(),
            vec![
                Target {
                    id: "i-1".into(),
                    port: Some(8001),
                    state: "healthy".into()
                },
                Target {
                    id: "10.0.0.2".into(),
                    port: None,
                    state: "draining".into()
                },
            ]
        );
        let attrs = r#"<DescribeTargetGroupAttributesResponse><DescribeTargetGroupAttributesResult><Attributes>
  <member><Key>stickiness.enabled</Key><Value>false</Value></member>
  <member><Key>deregistration_delay.timeout_seconds</Key><Value>30</Value></member>
</Attributes></DescribeTargetGroupAttributesResult></DescribeTargetGroupAttributesResponse>"#;
        assert_eq!(
            attributes(attrs).unwrap()[1],
            (
                "deregistration_delay.timeout_seconds".to_owned(),
                "30".to_owned()
            )
        );
    }
}
