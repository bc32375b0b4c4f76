//! Reading EC2's XML answers: the two responses warden asks for and the error document.
//! Pure functions, tested against answers in the shape EC2 documents.

use aws_smithy_xml::decode::{try_data, Document, ScopedDecoder};

use crate::Ec2Error;

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

fn bad(e: impl std::fmt::Display) -> Ec2Error {
    Ec2Error::Answer(e.to_string())
}

/// The zones of a DescribeAvailabilityZonesResponse.
pub(crate) fn zones(text: &str) -> Result<Vec<Zone>, Ec2Error> {
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

fn zone(item: &mut ScopedDecoder) -> Result<Zone, Ec2Error> {
    let (mut name, mut state) = (None, None);
    while let Some(mut field) = item.next_tag() {
        if field.start_el().matches("zoneName") {
            name = Some(try_data(&mut field).map_err(bad)?.into_owned());
        } else if field.start_el().matches("zoneState") {
            state = Some(try_data(&mut field).map_err(bad)?.into_owned());
        }
    }
    match (name, state) {
        (Some(name), Some(state)) => Ok(Zone { name, state }),
        _ => Err(bad("an availability zone without zoneName or zoneState")),
    }
}

/// The instance count and next token of a DescribeInstancesResponse page.
pub(crate) fn instances_page(text: &str) -> Result<InstancesPage, Ec2Error> {
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
pub(crate) fn error(status: u16, text: &str) -> Ec2Error {
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
    Ec2Error::Service {
        status,
        code,
        message,
    }
}

fn error_fields(text: &str) -> Option<(String, String)> {
    let mut doc = Document::new(text);
    let mut root = doc.root_element().ok()?;
    let (mut code, mut message) = (String::new(), String::new());
    while let Some(mut errors) = root.next_tag() {
        if !errors.start_el().matches("Errors") {
            continue;
        }
        while let Some(mut error) = errors.next_tag() {
            while let Some(mut field) = error.next_tag() {
                if field.start_el().matches("Code") {
                    code = try_data(&mut field).ok()?.into_owned();
                } else if field.start_el().matches("Message") {
                    message = try_data(&mut field).ok()?.into_owned();
                }
            }
        }
    }
    Some((code, message))
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
            Ec2Error::Service {
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
            Ec2Error::Service { code, .. } => assert_eq!(code, "HTTP 502"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn another_answer_is_refused_with_its_name() {
        let e = zones("<DescribeInstancesResponse/>").unwrap_err();
        assert!(e.to_string().contains("DescribeInstancesResponse"), "{e}");
    }
}
